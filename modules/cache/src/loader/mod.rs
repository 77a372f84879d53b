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
//!
//! The pieces: `entry` (format, jitter, XFetch), `l1` (the in-process tier), `clock`
//! (coarse wall clock), `get` (the read path), `fill` (who loads: fill and refresh locks),
//! `single_flight` and `load` (one load per key, its write-back), `admission` (`min_uses`),
//! `invalidate` (by key and tag, generations), `observe` (counters, policy report, gauges).

mod admission;
mod clock;
mod entry;
mod fill;
mod get;
mod invalidate;
mod l1;
mod load;
mod observe;
mod single_flight;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bulwark_kernel::kv::KvStore;

use crate::config::{CacheConfig, NamespacePolicy};
use clock::WallClock;
use l1::{L1, L1Cache, build_l1};
use observe::{Observed, describe_metrics};
use single_flight::WorkMap;

pub use entry::{Entry, FORMAT_VERSION, jittered, xfetch_should_refresh};
pub use invalidate::INVALIDATION_CHANNEL;
pub use observe::{HIT_SAMPLE, MIN_READS_TO_JUDGE, PolicyReport};

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

/// Bound on the bookkeeping maps; past it, stale entries are dropped.
const BOOKKEEPING_MAX: usize = 100_000;

/// Everything one cache holds: the shared store, L1, the namespaces, and the per-key
/// bookkeeping of this process (work in flight, errors, uses, generations).
struct CacheState {
    kv: Arc<dyn KvStore>,
    l1: L1,
    namespaces: BTreeMap<String, Namespace>,
    clock: WallClock,
    inflight: WorkMap<Arc<Entry>>,
    /// Misses being answered (lock attempt, wait, load) per key: one per key per process, so
    /// a thousand requests behind another instance's fill poll the shared store once, not a
    /// thousand times.
    answering: WorkMap<(bytes::Bytes, Outcome)>,
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

/// The cache. Cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<CacheState>,
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
            inner: Arc::new(CacheState {
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
}
