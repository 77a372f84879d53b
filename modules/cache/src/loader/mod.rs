//! The loader (C1–C3, C5, C7): `get_or_load(namespace, key, loader)` over two tiers —
//! L1 in process (moka, bounded in bytes) and L2 in the shared store (Redis in production).
//!
//! * Every write gets a jittered TTL (C1). An entry is *fresh* until its soft expiry, then
//!   *stale* until its hard expiry (`ttl + stale_ttl`), then gone.
//! * `swr`: a stale hit is served at once and one refresh runs in the background — one per
//!   process (single-flight) and one per cluster (a refresh lock in the shared store) (C2).
//! * `lock`: on a miss one process in the cluster loads under a lock with a lease and a
//!   fencing token; the others poll L2 for up to `lock_wait`, then fall back (C3). The filler
//!   writes back only while its token is still the current one, so a holder whose lease ran
//!   out cannot overwrite a newer fill (the lesson of memcache leases).
//! * Within a process, concurrent misses for a key share one load, and the load runs in its
//!   own task: a caller that goes away does not cancel it.
//! * XFetch (Vattani et al., VLDB 2015): with `early_refresh_beta` set, a fresh hit triggers a
//!   background refresh when `now − δ·β·ln(U) ≥ soft expiry`, δ being the last load's duration.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulwark_kernel::kv::KvStore;
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

use crate::config::{CacheConfig, Fallback, NamespacePolicy, Strategy};

/// Bumped when the entry encoding changes: older entries then read as misses.
pub const FORMAT_VERSION: u8 = 1;
/// Channel on which invalidations reach every instance's L1.
pub const INVALIDATION_CHANNEL: &str = "cache:invalidate";

#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("unknown cache namespace `{0}`")]
    UnknownNamespace(String),
    #[error("loader failed: {0}")]
    Loader(String),
    #[error("value not available: {0}")]
    Unavailable(String),
}

/// How a request was answered (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Stale,
    Miss,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Stale => "stale",
            Outcome::Miss => "miss",
        }
    }
}

/// A cached value with its expiry times (ms since the epoch) and the duration of the load
/// that produced it (XFetch's δ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    pub soft_expires_ms: u64,
    pub hard_expires_ms: u64,
    pub delta_ms: u64,
}

impl Entry {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(25 + self.value.len());
        b.put_u8(FORMAT_VERSION);
        b.put_u64(self.soft_expires_ms);
        b.put_u64(self.hard_expires_ms);
        b.put_u64(self.delta_ms);
        b.put_slice(&self.value);
        b.freeze()
    }

    /// `None` for another format version or a truncated value: a miss, never a crash.
    pub fn decode(mut raw: Bytes) -> Option<Self> {
        if raw.len() < 25 || raw[0] != FORMAT_VERSION {
            return None;
        }
        raw.advance(1);
        let soft_expires_ms = raw.get_u64();
        let hard_expires_ms = raw.get_u64();
        let delta_ms = raw.get_u64();
        Some(Self {
            value: raw,
            soft_expires_ms,
            hard_expires_ms,
            delta_ms,
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// TTL with jitter (C1): `ttl · (1 + jitter · U)`, U uniform in [0, 1).
pub fn jittered(ttl: Duration, jitter: f64, u: f64) -> Duration {
    ttl.mul_f64(1.0 + jitter * u.clamp(0.0, 1.0))
}

/// XFetch's decision: refresh early when `now − δ·β·ln(u) ≥ expiry` (u uniform in (0, 1]).
pub fn xfetch_should_refresh(
    now_ms: u64,
    expiry_ms: u64,
    delta_ms: u64,
    beta: f64,
    u: f64,
) -> bool {
    let u = u.clamp(f64::MIN_POSITIVE, 1.0);
    now_ms as f64 - delta_ms as f64 * beta * u.ln() >= expiry_ms as f64
}

/// Work on one key that concurrent callers share (see `Cache::join_or_start`).
type SharedWork<T> = Shared<BoxFuture<'static, Result<T, CacheError>>>;
/// Callers of one piece of shared work, by key.
type WorkMap<T> = Mutex<HashMap<String, SharedWork<T>>>;

struct Inner {
    kv: Arc<dyn KvStore>,
    l1: L1,
    namespaces: BTreeMap<String, Namespace>,
    clock: WallClock,
    inflight: WorkMap<Arc<Entry>>,
    /// Misses being answered (lock attempt, wait, load) per key: one per key per process, so
    /// a thousand requests behind another instance's fill poll the shared store once, not a
    /// thousand times.
    answering: WorkMap<(Bytes, Outcome)>,
    /// Recent loader failures: key -> (remembered until, ms; message). Pruned when large.
    errors: Mutex<HashMap<String, (u64, String)>>,
    /// Requests per key in the current admission window: key -> (window start ms, count).
    uses: Mutex<HashMap<String, (u64, u32)>>,
    /// The shared tier (L2) failed on its last use; cleared by the next success.
    degraded: std::sync::atomic::AtomicBool,
    /// Invalidations seen per key (here or broadcast): a load that started before one must
    /// not write its (possibly outdated) value back. Pruned when large.
    generations: Mutex<HashMap<String, u64>>,
}

/// A request past the L1 fast path: its key's names and its namespace's policy, in an `Arc`
/// shared with the work it starts (which runs in its own task).
struct Req {
    namespace: String,
    l1_key: String,
    l2_key: String,
    policy: Arc<NamespacePolicy>,
}

/// One namespace's policy, observations and L1: found with one lookup per request.
struct Namespace {
    policy: Arc<NamespacePolicy>,
    observed: Observed,
    l1: L1Cache,
}

/// Wall-clock milliseconds for expiry checks, from the kernel's coarse monotonic clock (a
/// memory read in the vDSO, a few ms of resolution — ample against TTLs of seconds) plus an
/// offset to the wall clock re-read at most once a second, so drift and clock steps show
/// within a second. A precise `clock_gettime` costs ~25 ns on this kind of VM, a tenth of an
/// L1 hit.
struct WallClock {
    base: coarsetime::Instant,
    /// Wall-clock ms at `base`.
    wall_at_base: AtomicU64,
    /// Ms after `base` of the last re-read.
    synced_at: AtomicU64,
}

impl WallClock {
    fn new() -> Self {
        let c = Self {
            base: coarsetime::Instant::now_without_cache_update(),
            wall_at_base: AtomicU64::new(0),
            synced_at: AtomicU64::new(0),
        };
        c.sync();
        c
    }

    /// Ms of the coarse clock since `base`.
    fn mono_ms(&self) -> u64 {
        coarsetime::Instant::now_without_cache_update()
            .duration_since(self.base)
            .as_millis()
    }

    fn sync(&self) {
        // The two reads side by side, so the offset does not take in a pause between them.
        let mono = self.mono_ms();
        let wall = now_ms();
        self.wall_at_base
            .store(wall.saturating_sub(mono), Ordering::Relaxed);
        self.synced_at.store(mono, Ordering::Relaxed);
    }

    fn wall_ms(&self) -> u64 {
        let mono = self.mono_ms();
        if mono.saturating_sub(self.synced_at.load(Ordering::Relaxed)) >= 1000 {
            self.sync();
            return self.wall_at_base.load(Ordering::Relaxed) + self.mono_ms();
        }
        self.wall_at_base.load(Ordering::Relaxed) + mono
    }
}

/// Bound on the bookkeeping maps; past it, stale entries are dropped.
const BOOKKEEPING_MAX: usize = 100_000;

/// What this process saw of a namespace, to hold against its declaration (C4).
struct Observed {
    hits: AtomicU64,
    stale: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    /// Registered once: the hot path records without building labels or looking them up.
    requests: [metrics::Counter; 3],
    durations: [metrics::Histogram; 3],
}

impl Observed {
    fn new(namespace: &str) -> Self {
        let results = [Outcome::Hit, Outcome::Stale, Outcome::Miss];
        Self {
            hits: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            requests: results.map(|o| {
                metrics::counter!("bulwark_cache_requests_total", "namespace" => namespace.to_owned(), "result" => o.label())
            }),
            durations: results.map(|o| {
                metrics::histogram!("bulwark_cache_request_duration_seconds", "namespace" => namespace.to_owned(), "result" => o.label())
            }),
        }
    }

    /// Count a request; `seconds` when it was timed.
    fn record(&self, outcome: Outcome, seconds: Option<f64>) {
        let i = match outcome {
            Outcome::Hit => 0,
            Outcome::Stale => 1,
            Outcome::Miss => 2,
        };
        [&self.hits, &self.stale, &self.misses][i].fetch_add(1, Ordering::Relaxed);
        self.requests[i].increment(1);
        if let Some(s) = seconds {
            self.durations[i].record(s);
        }
    }
}

/// One L1 hit in this many is timed for `bulwark_cache_request_duration_seconds`. Quantiles
/// come from bucket ratios, so sampling leaves them unbiased; the histogram's `_count` for
/// `result="hit"` counts timed hits only (rates come from `bulwark_cache_requests_total`).
pub const HIT_SAMPLE: u32 = 16;

/// Should this request's latency be timed (if it turns out a hit)? A per-thread counter:
/// no shared cache line.
fn sample_hit() -> bool {
    thread_local! {
        static TICK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    TICK.with(|t| {
        let n = t.get().wrapping_add(1);
        t.set(n);
        n.is_multiple_of(HIT_SAMPLE)
    })
}

/// Bytes an L1 entry costs beyond its key and value: moka's node, hash and expiry bookkeeping,
/// the `Entry` and its `Arc`, allocator rounding. Calibrated with `scripts/bench-cache`
/// (benchmark 5: 1M entries, RSS growth vs accounted bytes), so `l1_max_bytes` bounds real memory.
const ENTRY_OVERHEAD_BYTES: usize = 512;

/// Declared versus observed behaviour of one namespace (`GET /api/cache/policies`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicyReport {
    pub namespace: String,
    pub declared: NamespacePolicy,
    pub reads: u64,
    pub hits: u64,
    pub stale: u64,
    pub misses: u64,
    /// Writes seen as invalidations.
    pub invalidations: u64,
    /// Hits over reads; stale serves are not hits.
    pub hit_rate: Option<f64>,
    pub reads_per_write: Option<f64>,
    /// Where the behaviour contradicts the declaration.
    pub flags: Vec<String>,
}

/// Reads below this are too few to judge a namespace by.
pub const MIN_READS_TO_JUDGE: u64 = 100;

/// The cache. Cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct ByHardExpiry;
impl moka::Expiry<L1Key, Arc<Entry>> for ByHardExpiry {
    fn expire_after_create(
        &self,
        _key: &L1Key,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(
            value.hard_expires_ms.saturating_sub(now_ms()),
        ))
    }
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "bulwark_cache_requests_total",
        "Cache requests by namespace and result (hit, stale, miss); stale is not a hit."
    );
    describe_histogram!(
        "bulwark_cache_request_duration_seconds",
        Unit::Seconds,
        "Cache request latency by result."
    );
    describe_counter!(
        "bulwark_cache_loads_total",
        "Loader runs by outcome (ok, error)."
    );
    describe_histogram!(
        "bulwark_cache_load_duration_seconds",
        Unit::Seconds,
        "Loader duration."
    );
    describe_histogram!(
        "bulwark_cache_lock_wait_seconds",
        Unit::Seconds,
        "Time waiters spent waiting for the fill lock holder."
    );
    describe_counter!(
        "bulwark_cache_lock_timeouts_total",
        "Waiters that gave up after lock_wait and used the fallback."
    );
    describe_counter!(
        "bulwark_cache_evictions_total",
        "Entries removed by tier and cause (size, expired, invalidated)."
    );
    describe_gauge!(
        "bulwark_cache_memory_bytes",
        Unit::Bytes,
        "Bytes used per tier (L1 as weighed, L2 from the store)."
    );
    describe_gauge!(
        "bulwark_cache_degraded",
        "1 while the shared tier (Redis) is failing: L1 and per-process single-flight still protect the origin."
    );
    describe_counter!(
        "bulwark_cache_admission_rejections_total",
        "Loaded values not stored because the key had fewer than min_uses requests in its window."
    );
    describe_gauge!(
        "bulwark_cache_memory_limit_bytes",
        Unit::Bytes,
        "Configured limit per tier (L2 only when Redis maxmemory is set)."
    );
}

fn tag_set(namespace: &str, tag: &str) -> String {
    format!("cache-tag:{namespace}:{tag}")
}

/// An L1 key, `namespace:key` (namespace names never contain `:`). Looked up through
/// [`KeyRef`], so a hit on the fast path builds no string.
#[derive(Clone, Debug, PartialEq, Eq)]
struct L1Key(String);

impl L1Key {
    fn parts(&self) -> KeyRef<'_> {
        KeyRef::parse(&self.0)
    }
}

impl std::hash::Hash for L1Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

/// A borrowed L1 key; hashes like the [`L1Key`] it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeyRef<'a> {
    namespace: &'a str,
    key: &'a str,
}

impl std::hash::Hash for KeyRef<'_> {
    /// The key alone, in one write: equal keys of two namespaces share a hash (rare, and
    /// settled by equality), and the hit path hashes once.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.key.as_bytes());
    }
}

impl<'a> KeyRef<'a> {
    fn parse(l1_key: &'a str) -> Self {
        let (namespace, key) = l1_key.split_once(':').unwrap_or(("", l1_key));
        Self { namespace, key }
    }
}

impl moka::Equivalent<L1Key> for KeyRef<'_> {
    fn equivalent(&self, key: &L1Key) -> bool {
        *self == key.parts()
    }
}

type L1Cache = moka::future::Cache<L1Key, Arc<Entry>>;

/// The in-process tier: one bounded moka cache per namespace with an `l1_share`, one shared by
/// the others, so a busy namespace cannot evict a small, hot one.
struct L1 {
    shares: BTreeMap<String, L1Cache>,
    rest: L1Cache,
}

impl L1 {
    /// The cache holding `namespace`'s keys.
    fn of(&self, namespace: &str) -> &L1Cache {
        self.shares.get(namespace).unwrap_or(&self.rest)
    }

    async fn get(&self, key: KeyRef<'_>) -> Option<Arc<Entry>> {
        self.of(key.namespace).get(&key).await
    }

    async fn insert(&self, l1_key: &str, entry: Arc<Entry>) {
        let k = KeyRef::parse(l1_key);
        self.of(k.namespace)
            .insert(L1Key(l1_key.to_owned()), entry)
            .await;
    }

    async fn invalidate(&self, l1_key: &str) {
        let k = KeyRef::parse(l1_key);
        self.of(k.namespace).invalidate(&k).await;
    }

    fn all(&self) -> impl Iterator<Item = &L1Cache> {
        self.shares.values().chain(std::iter::once(&self.rest))
    }
}

fn build_l1(capacity: u64) -> L1Cache {
    moka::future::Cache::builder()
        .max_capacity(capacity)
        .weigher(|k: &L1Key, v: &Arc<Entry>| {
            u32::try_from(k.0.len() + v.value.len() + ENTRY_OVERHEAD_BYTES).unwrap_or(u32::MAX)
        })
        .expire_after(ByHardExpiry)
        .eviction_listener(|k: Arc<L1Key>, _v, cause| {
            use moka::notification::RemovalCause as C;
            let cause = match cause {
                C::Size => "size",
                C::Expired => "expired",
                C::Explicit => "invalidated",
                C::Replaced => return,
            };
            metrics::counter!("bulwark_cache_evictions_total",
                "namespace" => k.parts().namespace.to_owned(), "tier" => "l1", "cause" => cause)
            .increment(1);
        })
        .build()
}

impl Cache {
    pub fn new(cfg: &CacheConfig, kv: Arc<dyn KvStore>) -> Self {
        describe_metrics();
        // Namespaces with an `l1_share` get their own bounded L1; the rest share what is left.
        let mut shares = BTreeMap::new();
        let mut given = 0u64;
        for (ns, p) in &cfg.namespaces {
            if let Some(share) = p.l1_share {
                let bytes = ((cfg.l1_max_bytes as f64) * share) as u64;
                given += bytes;
                shares.insert(ns.clone(), build_l1(bytes.max(1)));
            }
        }
        let l1 = L1 {
            shares,
            rest: build_l1(cfg.l1_max_bytes.saturating_sub(given).max(1)),
        };
        let namespaces = cfg
            .namespaces
            .iter()
            .map(|(n, p)| {
                let ns = Namespace {
                    policy: Arc::new(p.clone()),
                    observed: Observed::new(n),
                    l1: l1.of(n).clone(),
                };
                (n.clone(), ns)
            })
            .collect();
        metrics::gauge!("bulwark_cache_memory_limit_bytes", "tier" => "l1")
            .set(cfg.l1_max_bytes as f64);
        metrics::gauge!("bulwark_cache_degraded").set(0.0);
        for ns in cfg.namespaces.keys() {
            metrics::counter!("bulwark_cache_admission_rejections_total", "namespace" => ns.clone())
                .increment(0);
        }
        Self {
            inner: Arc::new(Inner {
                kv,
                l1,
                namespaces,
                clock: WallClock::new(),
                inflight: Mutex::default(),
                answering: Mutex::default(),
                errors: Mutex::default(),
                uses: Mutex::default(),
                degraded: std::sync::atomic::AtomicBool::new(false),
                generations: Mutex::default(),
            }),
        }
    }

    fn namespace(&self, namespace: &str) -> Result<&Namespace, CacheError> {
        self.inner
            .namespaces
            .get(namespace)
            .ok_or_else(|| CacheError::UnknownNamespace(namespace.to_owned()))
    }

    fn policy(&self, namespace: &str) -> Result<&NamespacePolicy, CacheError> {
        self.namespace(namespace).map(|n| &*n.policy)
    }

    /// Declared policy next to observed behaviour, with contradictions flagged (C4).
    pub fn policy_report(&self) -> Vec<PolicyReport> {
        use crate::config::CacheClass;
        self.inner
            .namespaces
            .iter()
            .map(|(ns, n)| {
                let (declared, o) = (&n.policy, &n.observed);
                let get = |f: fn(&Observed) -> &AtomicU64| f(o).load(Ordering::Relaxed);
                let (hits, stale, misses, invalidations) =
                    (get(|o| &o.hits), get(|o| &o.stale), get(|o| &o.misses), get(|o| &o.invalidations));
                let reads = hits + stale + misses;
                let hit_rate = (reads > 0).then(|| hits as f64 / reads as f64);
                let reads_per_write = (invalidations > 0).then(|| reads as f64 / invalidations as f64);
                let mut flags = Vec::new();
                if reads >= MIN_READS_TO_JUDGE {
                    if let Some(rpw) = reads_per_write
                        && rpw < 10.0
                        && declared.class == CacheClass::ReadMostly
                    {
                        flags.push(format!("declared read_mostly but observed {rpw:.1} reads per write (expected ≥ 10)"));
                    }
                    if let Some(h) = hit_rate
                        && h < 0.5
                    {
                        flags.push(format!(
                            "hit rate {:.0}%: long-tail keys (read about once) or a TTL too short for how often keys are read",
                            h * 100.0
                        ));
                    }
                }
                PolicyReport {
                    namespace: ns.clone(),
                    declared: (**declared).clone(),
                    reads,
                    hits,
                    stale,
                    misses,
                    invalidations,
                    hit_rate,
                    reads_per_write,
                    flags,
                }
            })
            .collect()
    }

    /// Refresh the memory gauges: L1 as weighed, L2 from the store (Redis INFO).
    pub async fn record_memory(&self) {
        let l1 = self.l1_bytes().await;
        metrics::gauge!("bulwark_cache_memory_bytes", "tier" => "l1").set(l1 as f64);
        // Redis's own removals, across its keys (not per namespace: Redis does not say).
        if let Ok(Some((evicted, expired))) = self.inner.kv.removals().await {
            metrics::counter!("bulwark_cache_evictions_total", "namespace" => "*", "tier" => "l2", "cause" => "size")
                .absolute(evicted);
            metrics::counter!("bulwark_cache_evictions_total", "namespace" => "*", "tier" => "l2", "cause" => "expired")
                .absolute(expired);
        }
        if let Ok((used, limit)) = self.inner.kv.memory().await {
            metrics::gauge!("bulwark_cache_memory_bytes", "tier" => "l2").set(used as f64);
            if let Some(limit) = limit {
                metrics::gauge!("bulwark_cache_memory_limit_bytes", "tier" => "l2")
                    .set(limit as f64);
            }
        }
    }

    /// Bytes held by L1 (as weighed).
    pub async fn l1_bytes(&self) -> u64 {
        let mut total = 0;
        for c in self.inner.l1.all() {
            c.run_pending_tasks().await;
            total += c.weighted_size();
        }
        total
    }

    /// Note an L2 failure: the `degraded` gauge and one log line per transition.
    fn l2_failed(&self, error: &bulwark_kernel::kv::KvError) {
        if matches!(error, bulwark_kernel::kv::KvError::Unavailable(_))
            && !self.inner.degraded.swap(true, Ordering::Relaxed)
        {
            metrics::gauge!("bulwark_cache_degraded").set(1.0);
            tracing::warn!(
                message = "Cache degraded: the shared tier is unavailable; serving from L1 with per-process single-flight.",
                %error
            );
        }
    }

    fn l2_ok(&self) {
        if self.inner.degraded.swap(false, Ordering::Relaxed) {
            metrics::gauge!("bulwark_cache_degraded").set(0.0);
            tracing::info!(message = "Cache recovered: the shared tier answers again.");
        }
    }

    fn generation(&self, l1_key: &str) -> u64 {
        let g = self
            .inner
            .generations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        g.get(l1_key).copied().unwrap_or(0)
    }

    fn bump_generation(&self, l1_key: &str) {
        let mut g = self
            .inner
            .generations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if g.len() >= BOOKKEEPING_MAX {
            // Only loads in flight need their key's count; dropping all costs at most one
            // outdated write-back, which the next invalidation or the TTL corrects.
            g.clear();
        }
        *g.entry(l1_key.to_owned()).or_insert(0) += 1;
    }

    /// Is the cache degraded (shared tier failing) right now?
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed)
    }

    /// A failure of `l1_key`'s loader still remembered at `now`.
    fn recent_error(&self, l1_key: &str, now: u64) -> Option<String> {
        let errors = self.inner.errors.lock().unwrap_or_else(|p| p.into_inner());
        errors
            .get(l1_key)
            .filter(|(until, _)| now < *until)
            .map(|(_, m)| m.clone())
    }

    fn remember_error(&self, l1_key: &str, policy: &NamespacePolicy, message: &str) {
        if policy.error_ttl.is_zero() {
            return;
        }
        let now = now_ms();
        let mut errors = self.inner.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() >= BOOKKEEPING_MAX {
            errors.retain(|_, (until, _)| *until > now);
        }
        errors.insert(
            l1_key.to_owned(),
            (
                now + policy.error_ttl.as_millis() as u64,
                message.to_owned(),
            ),
        );
    }

    /// Count one request of `l1_key` for admission; returns the count in the current window.
    fn count_use(&self, l1_key: &str, policy: &NamespacePolicy) -> u32 {
        if policy.min_uses <= 1 {
            return u32::MAX;
        }
        let now = now_ms();
        let window = policy.min_uses_window.as_millis() as u64;
        let mut uses = self.inner.uses.lock().unwrap_or_else(|p| p.into_inner());
        if uses.len() >= BOOKKEEPING_MAX {
            uses.retain(|_, (start, _)| now.saturating_sub(*start) < window);
        }
        let (start, count) = uses.entry(l1_key.to_owned()).or_insert((now, 0));
        if now.saturating_sub(*start) >= window {
            *start = now;
            *count = 0;
        }
        *count = count.saturating_add(1);
        *count
    }

    fn admitted(&self, l1_key: &str, policy: &NamespacePolicy) -> bool {
        if policy.min_uses <= 1 {
            return true;
        }
        let uses = self.inner.uses.lock().unwrap_or_else(|p| p.into_inner());
        uses.get(l1_key).is_some_and(|(_, c)| *c >= policy.min_uses)
    }

    /// The entry in L2 (copied into L1 when the namespace keeps one); a miss when the store
    /// fails or holds something unreadable.
    async fn lookup_l2(&self, l1_key: &str, l2_key: &str, use_l1: bool) -> Option<Arc<Entry>> {
        let got = self.inner.kv.get(l2_key).await;
        match &got {
            Ok(_) => self.l2_ok(),
            Err(e) => self.l2_failed(e),
        }
        match got {
            Ok(Some(raw)) => match Entry::decode(raw) {
                Some(e) => {
                    let e = Arc::new(e);
                    if use_l1 {
                        self.inner.l1.insert(l1_key, e.clone()).await;
                    }
                    Some(e)
                }
                None => {
                    tracing::warn!(
                        message = "Unreadable cache entry; treated as a miss.",
                        key = l2_key
                    );
                    None
                }
            },
            Ok(None) => None,
            Err(error) => {
                // L2 down: L1 and single-flight still protect the database in this process.
                tracing::debug!(message = "L2 read failed; treated as a miss.", %error);
                None
            }
        }
    }

    /// The value for `key` in `namespace`, loading it with `loader` when needed.
    pub async fn get_or_load<F, Fut>(
        &self,
        namespace: &str,
        key: &str,
        loader: F,
    ) -> Result<(Bytes, Outcome), CacheError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        // Hit latency is timed for one hit in HIT_SAMPLE (two precise clock reads would add a
        // sixth to a hit); misses and stale serves are always timed. quanta reads the TSC
        // where it is invariant, else the monotonic clock.
        let sampled = sample_hit();
        let started = sampled.then(quanta::Instant::now);
        let ns = self.namespace(namespace)?;
        let policy = &ns.policy;
        if policy.min_uses > 1 {
            self.count_use(&format!("{namespace}:{key}"), policy);
        }
        let now = self.inner.clock.wall_ms();
        // Fast path: a fresh L1 hit with no early refresh due needs nothing else, and builds
        // no key string.
        let in_l1 = if policy.l1 {
            ns.l1.get(&KeyRef { namespace, key }).await
        } else {
            None
        };
        if policy.early_refresh_beta.is_none()
            && let Some(e) = &in_l1
            && now < e.soft_expires_ms
        {
            ns.observed
                .record(Outcome::Hit, started.map(|s| s.elapsed().as_secs_f64()));
            return Ok((e.value.clone(), Outcome::Hit));
        }
        let started = started.unwrap_or_else(quanta::Instant::now);
        let req = Arc::new(Req {
            namespace: namespace.to_owned(),
            l1_key: format!("{namespace}:{key}"),
            l2_key: format!("cache:{namespace}:{key}"),
            policy: ns.policy.clone(),
        });
        let found = match in_l1 {
            Some(e) => Some(e),
            None => self.lookup_l2(&req.l1_key, &req.l2_key, policy.l1).await,
        }
        .filter(|e| now < e.hard_expires_ms);
        let result = match found {
            Some(e) if now < e.soft_expires_ms => {
                if let Some(beta) = policy.early_refresh_beta
                    && xfetch_should_refresh(
                        now,
                        e.soft_expires_ms,
                        e.delta_ms,
                        beta,
                        rand::random::<f64>(),
                    )
                {
                    self.refresh_in_background(&req, loader);
                }
                Ok((e.value.clone(), Outcome::Hit))
            }
            Some(e) if policy.strategy == Strategy::Swr => {
                self.refresh_in_background(&req, loader);
                Ok((e.value.clone(), Outcome::Stale))
            }
            stale => {
                // A load that failed moments ago is not retried until error_ttl passed; a good
                // stale value is served instead of an error.
                if let Some(message) = self.recent_error(&req.l1_key, now) {
                    match stale {
                        Some(e) => Ok((e.value.clone(), Outcome::Stale)),
                        None => Err(CacheError::Loader(message)),
                    }
                } else {
                    match self.answer_once(&req, loader, stale.clone()).await {
                        Err(CacheError::Loader(_)) if stale.is_some() => Ok((
                            stale.map(|e| e.value.clone()).unwrap_or_default(),
                            Outcome::Stale,
                        )),
                        other => other,
                    }
                }
            }
        };
        if let Ok((_, outcome)) = &result {
            ns.observed
                .record(*outcome, Some(started.elapsed().as_secs_f64()));
        }
        result
    }

    /// [`Cache::fill`] once per key per process: concurrent misses join the first one's
    /// answer (and its wait for another instance's fill) instead of each polling the store.
    async fn answer_once<F, Fut>(
        &self,
        req: &Arc<Req>,
        loader: F,
        stale: Option<Arc<Entry>>,
    ) -> Result<(Bytes, Outcome), CacheError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        let owned = req.clone();
        self.join_or_start(
            |inner| &inner.answering,
            &req.l1_key,
            move |this| async move { this.fill(&owned, loader, stale).await },
        )
        .await
    }

    /// The shared future of `key` in the map `pick` selects, or a new one running `work` in its
    /// own task: callers join it, a cancelled caller does not cancel it, and the task removes
    /// itself from the map when done even if every caller went away.
    fn join_or_start<T, W, Fut>(
        &self,
        pick: fn(&Inner) -> &WorkMap<T>,
        key: &str,
        work: W,
    ) -> SharedWork<T>
    where
        T: Clone + Send + Sync + 'static,
        W: FnOnce(Cache) -> Fut,
        Fut: Future<Output = Result<T, CacheError>> + Send + 'static,
    {
        let mut map = pick(&self.inner).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(key) {
            return f.clone();
        }
        let this = self.clone();
        let running = work(self.clone());
        let owned_key = key.to_owned();
        let task = tokio::spawn(async move {
            let r = running.await;
            pick(&this.inner)
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&owned_key);
            r
        });
        let shared = async move {
            task.await
                .unwrap_or_else(|e| Err(CacheError::Loader(format!("cache task failed: {e}"))))
        }
        .boxed()
        .shared();
        map.insert(key.to_owned(), shared.clone());
        shared
    }

    fn refresh_in_background<F, Fut>(&self, req: &Arc<Req>, loader: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        let this = self.clone();
        let req = req.clone();
        tokio::spawn(async move {
            // One refresh per cluster: whoever takes the refresh lock refreshes; the rest keep
            // serving stale. If the store is down, refresh locally (single-flight still holds).
            let lock_key = format!("cache-refresh:{}:{}", req.namespace, req.l1_key);
            let guard = match this
                .inner
                .kv
                .try_lock(&lock_key, req.policy.lock_lease)
                .await
            {
                Ok(Some(g)) => Some(g),
                Ok(None) => return,
                Err(_) => None,
            };
            let _ = this
                .single_flight(
                    &req,
                    loader,
                    guard.as_ref().map(|g| (lock_key.clone(), g.fencing_token)),
                )
                .await;
            if let Some(g) = guard {
                let _ = this.inner.kv.release_lock(&g).await;
            }
        });
    }

    async fn fill<F, Fut>(
        &self,
        req: &Arc<Req>,
        loader: F,
        stale: Option<Arc<Entry>>,
    ) -> Result<(Bytes, Outcome), CacheError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        // The answer before this one may have filled the key between this request's lookup
        // and now (it finished and left the map): take its value rather than load again.
        if req.policy.l1
            && let Some(e) = self.inner.l1.get(KeyRef::parse(&req.l1_key)).await
            && now_ms() < e.soft_expires_ms
        {
            return Ok((e.value.clone(), Outcome::Miss));
        }
        if req.policy.strategy == Strategy::Swr {
            let e = self.single_flight(req, loader, None).await?;
            return Ok((e.value.clone(), Outcome::Miss));
        }
        if !self.admitted(&req.l1_key, &req.policy) {
            // Not stored anyway (admission): no one waits for it, load locally.
            let e = self.single_flight(req, loader, None).await?;
            return Ok((e.value.clone(), Outcome::Miss));
        }
        let lock_key = format!("cache-fill:{}", &req.l2_key);
        let locked = self
            .inner
            .kv
            .try_lock(&lock_key, req.policy.lock_lease)
            .await;
        if let Err(e) = &locked {
            self.l2_failed(e);
        }
        match locked {
            Ok(Some(guard)) => {
                // Same race across instances: a fill may have completed and released the lock
                // just before we took it.
                if let Some(e) = self.fresh_in_l2(req).await {
                    let _ = self.inner.kv.release_lock(&guard).await;
                    return Ok((e.value.clone(), Outcome::Miss));
                }
                let r = self
                    .single_flight(req, loader, Some((lock_key, guard.fencing_token)))
                    .await;
                let _ = self.inner.kv.release_lock(&guard).await;
                r.map(|e| (e.value.clone(), Outcome::Miss))
            }
            Ok(None) => {
                let waited = Instant::now();
                let deadline = waited + req.policy.lock_wait;
                let mut polls = 0u32;
                while Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    polls += 1;
                    // Every 100 ms: if the holder died, its lease ran out and the lock is free;
                    // take it over and load (a crashed filler blocks no longer than its lease).
                    if polls.is_multiple_of(10)
                        && let Ok(Some(guard)) = self
                            .inner
                            .kv
                            .try_lock(&lock_key, req.policy.lock_lease)
                            .await
                    {
                        metrics::histogram!("bulwark_cache_lock_wait_seconds", "namespace" => req.namespace.to_owned())
                            .record(waited.elapsed().as_secs_f64());
                        // The holder may have filled and released just now: look again first.
                        if let Some(e) = self.fresh_in_l2(req).await {
                            let _ = self.inner.kv.release_lock(&guard).await;
                            return Ok((e.value.clone(), Outcome::Miss));
                        }
                        let r = self
                            .single_flight(
                                req,
                                loader,
                                Some((lock_key.clone(), guard.fencing_token)),
                            )
                            .await;
                        let _ = self.inner.kv.release_lock(&guard).await;
                        return r.map(|e| (e.value.clone(), Outcome::Miss));
                    }
                    if let Some(e) = self.fresh_in_l2(req).await {
                        metrics::histogram!("bulwark_cache_lock_wait_seconds", "namespace" => req.namespace.to_owned())
                            .record(waited.elapsed().as_secs_f64());
                        return Ok((e.value.clone(), Outcome::Miss));
                    }
                }
                metrics::counter!("bulwark_cache_lock_timeouts_total", "namespace" => req.namespace.to_owned()).increment(1);
                match (req.policy.fallback, stale) {
                    (Fallback::Stale, Some(e)) => Ok((e.value.clone(), Outcome::Stale)),
                    (Fallback::Unavailable, _) => Err(CacheError::Unavailable(format!(
                        "no value for `{}` within lock_wait",
                        req.l1_key
                    ))),
                    _ => self
                        .single_flight(req, loader, None)
                        .await
                        .map(|e| (e.value.clone(), Outcome::Miss)),
                }
            }
            // The shared store is down: protect the database per process (single-flight).
            Err(_) => self
                .single_flight(req, loader, None)
                .await
                .map(|e| (e.value.clone(), Outcome::Miss)),
        }
    }

    /// A fresh entry for the key in L2 (copied into L1 when the req.namespace keeps one).
    async fn fresh_in_l2(&self, req: &Req) -> Option<Arc<Entry>> {
        let raw = self.inner.kv.get(&req.l2_key).await.ok()??;
        let e = Entry::decode(raw).filter(|e| now_ms() < e.soft_expires_ms)?;
        let e = Arc::new(e);
        if req.policy.l1 {
            self.inner.l1.insert(&req.l1_key, e.clone()).await;
        }
        Some(e)
    }

    /// One load per key per process; the load runs in its own task.
    async fn single_flight<F, Fut>(
        &self,
        req: &Arc<Req>,
        loader: F,
        fence: Option<(String, u64)>,
    ) -> Result<Arc<Entry>, CacheError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        let owned = req.clone();
        self.join_or_start(
            |inner| &inner.inflight,
            &req.l1_key,
            move |this| async move { this.load(&owned, loader, fence).await },
        )
        .await
    }

    async fn load<F, Fut>(
        &self,
        req: &Arc<Req>,
        loader: F,
        fence: Option<(String, u64)>,
    ) -> Result<Arc<Entry>, CacheError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        let started = Instant::now();
        let generation = self.generation(&req.l1_key);
        let loaded = loader().await;
        let elapsed = started.elapsed();
        metrics::histogram!("bulwark_cache_load_duration_seconds", "namespace" => req.namespace.to_owned())
            .record(elapsed.as_secs_f64());
        let value = match loaded {
            Ok(v) => {
                metrics::counter!("bulwark_cache_loads_total", "namespace" => req.namespace.to_owned(), "outcome" => "ok")
                    .increment(1);
                v
            }
            Err(e) => {
                metrics::counter!("bulwark_cache_loads_total", "namespace" => req.namespace.to_owned(), "outcome" => "error")
                    .increment(1);
                self.remember_error(&req.l1_key, &req.policy, &e);
                return Err(CacheError::Loader(e));
            }
        };
        let now = now_ms();
        let ttl = jittered(req.policy.ttl, req.policy.jitter, rand::random::<f64>());
        let soft = now + ttl.as_millis() as u64;
        let entry = Arc::new(Entry {
            value,
            soft_expires_ms: soft,
            hard_expires_ms: soft + req.policy.stale_ttl.as_millis() as u64,
            delta_ms: elapsed.as_millis() as u64,
        });
        if entry.value.len() > req.policy.max_value_bytes {
            // Served, not cached.
            return Ok(entry);
        }
        if !self.admitted(&req.l1_key, &req.policy) {
            // Served, not cached: too few requests yet to earn a place (min_uses).
            metrics::counter!("bulwark_cache_admission_rejections_total", "namespace" => req.namespace.to_owned())
                .increment(1);
            return Ok(entry);
        }
        // Guarded write-back: a filler whose key was invalidated while it loaded does not
        // write (what it read may predate the write that caused the invalidation) ...
        if self.generation(&req.l1_key) != generation {
            tracing::debug!(
                message = "Key invalidated while loading; result served, not written.",
                key = req.l2_key
            );
            return Ok(entry);
        }
        // ... nor does a filler whose lock was lost (lease expired, someone else took it).
        if let Some((lock_key, token)) = &fence
            && self.inner.kv.current_fencing_token(lock_key).await.ok() != Some(*token)
        {
            tracing::warn!(
                message = "Fill lock lost while loading; result not written.",
                key = req.l2_key
            );
            return Ok(entry);
        }
        let l2_ttl = Duration::from_millis(entry.hard_expires_ms.saturating_sub(now).max(1));
        if let Err(error) = self
            .inner
            .kv
            .set(&req.l2_key, entry.encode(), Some(l2_ttl))
            .await
        {
            tracing::debug!(message = "L2 write failed; value kept in L1 only.", %error);
            self.l2_failed(&error);
        } else {
            self.l2_ok();
        }
        if req.policy.l1 {
            self.inner.l1.insert(&req.l1_key, entry.clone()).await;
        }
        Ok(entry)
    }

    /// [`Cache::get_or_load`], and file a loaded key under `tags` so that
    /// [`Cache::invalidate_tag`] can drop every key of a tag at once (e.g. all pages that show
    /// one product). The tag index lives in the shared store with the entry's lifetime.
    pub async fn get_or_load_tagged<F, Fut>(
        &self,
        namespace: &str,
        key: &str,
        tags: &[&str],
        loader: F,
    ) -> Result<(Bytes, Outcome), CacheError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        let result = self.get_or_load(namespace, key, loader).await?;
        if result.1 == Outcome::Miss {
            let policy = self.policy(namespace)?;
            let lifetime = policy.ttl.mul_f64(1.0 + policy.jitter) + policy.stale_ttl;
            for tag in tags {
                if let Err(error) = self
                    .inner
                    .kv
                    .presence_heartbeat(&tag_set(namespace, tag), key, lifetime)
                    .await
                {
                    tracing::warn!(message = "Tag index not updated; invalidate the key itself.", tag = %tag, %error);
                }
            }
        }
        Ok(result)
    }

    /// Invalidate every key filed under `tag` in `namespace` (C7), on every instance. Returns
    /// how many keys were invalidated.
    pub async fn invalidate_tag(&self, namespace: &str, tag: &str) -> Result<usize, CacheError> {
        self.policy(namespace)?;
        let set = tag_set(namespace, tag);
        let keys = self
            .inner
            .kv
            .presence_members(&set)
            .await
            .map_err(|e| CacheError::Unavailable(format!("tag index: {e}")))?;
        for key in &keys {
            self.invalidate(namespace, key).await?;
            let _ = self.inner.kv.presence_remove(&set, key).await;
        }
        Ok(keys.len())
    }

    /// Active invalidation (C7): drop the key from L2 and this L1, and tell every instance.
    pub async fn invalidate(&self, namespace: &str, key: &str) -> Result<(), CacheError> {
        self.policy(namespace)?;
        if let Ok(n) = self.namespace(namespace) {
            n.observed.invalidations.fetch_add(1, Ordering::Relaxed);
        }
        let l1_key = format!("{namespace}:{key}");
        self.bump_generation(&l1_key);
        self.inner.l1.invalidate(&l1_key).await;
        let _ = self
            .inner
            .kv
            .delete(&format!("cache:{namespace}:{key}"))
            .await;
        if let Err(error) = self
            .inner
            .kv
            .publish(INVALIDATION_CHANNEL, Bytes::from(l1_key))
            .await
        {
            tracing::warn!(message = "Invalidation not broadcast; other instances keep L1 copies until expiry.", %error);
        }
        Ok(())
    }

    /// Apply invalidations broadcast by other instances to this L1 until `stop` fires.
    pub async fn follow_invalidations(self, stop: impl Future<Output = ()>) {
        let Ok(mut stream) = self.inner.kv.subscribe(INVALIDATION_CHANNEL).await else {
            return;
        };
        use futures::StreamExt as _;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                msg = stream.next() => match msg {
                    Some(key) => {
                        let key = String::from_utf8_lossy(&key).into_owned();
                        self.bump_generation(&key);
                        self.inner.l1.invalidate(&key).await;
                    }
                    None => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher as _;

    #[test]
    fn a_borrowed_key_finds_its_owned_twin() {
        let s = std::collections::hash_map::RandomState::new();
        let owned = L1Key("orders:42:page".to_owned());
        let probe = KeyRef {
            namespace: "orders",
            key: "42:page",
        };
        assert_eq!(s.hash_one(&owned), s.hash_one(probe));
        assert!(moka::Equivalent::equivalent(&probe, &owned));
        // Same key, other namespace: may share a hash, never equal.
        let other = KeyRef {
            namespace: "users",
            key: "42:page",
        };
        assert!(!moka::Equivalent::equivalent(&other, &owned));
        assert_eq!(KeyRef::parse("orders:42:page"), probe);
    }

    #[tokio::test]
    async fn l1_lookups_by_parts_hit_and_miss_correctly() {
        let l1 = L1 {
            shares: BTreeMap::new(),
            rest: build_l1(1 << 20),
        };
        let e = Arc::new(Entry {
            value: Bytes::from_static(b"v"),
            soft_expires_ms: now_ms() + 60_000,
            hard_expires_ms: now_ms() + 120_000,
            delta_ms: 1,
        });
        l1.insert("a:k", e.clone()).await;
        let hit = l1
            .get(KeyRef {
                namespace: "a",
                key: "k",
            })
            .await;
        assert_eq!(hit.as_deref(), Some(&*e));
        let miss = l1
            .get(KeyRef {
                namespace: "b",
                key: "k",
            })
            .await;
        assert!(miss.is_none(), "another namespace's key must not hit");
        l1.invalidate("a:k").await;
        assert!(l1.get(KeyRef::parse("a:k")).await.is_none());
    }

    #[test]
    fn the_wall_clock_tracks_the_system_clock() {
        let c = WallClock::new();
        for _ in 0..4 {
            let before = now_ms();
            let ours = c.wall_ms();
            let after = now_ms();
            // The coarse clock lags by at most a tick (a few ms; 10 ms at HZ=100).
            assert!(
                ours + 25 >= before && ours <= after + 25,
                "derived {ours} outside system [{before}, {after}]"
            );
            std::thread::sleep(Duration::from_millis(600));
        }
    }

    #[test]
    fn one_hit_in_hit_sample_is_timed() {
        let timed = (0..HIT_SAMPLE * 100).filter(|_| sample_hit()).count();
        assert_eq!(timed, 100);
    }
}
