//! What the cache observes: per-namespace counters and the sampled hit timing, the
//! declared-vs-observed policy report (C4), memory gauges and the degraded flag.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Cache, Outcome};
use crate::config::NamespacePolicy;

/// One L1 hit in this many is timed for `bulwark_cache_request_duration_seconds`. Quantiles
/// come from bucket ratios, so sampling leaves them unbiased; the histogram's `_count` for
/// `result="hit"` counts timed hits only (rates come from `bulwark_cache_requests_total`).
pub const HIT_SAMPLE: u32 = 16;

/// Reads below this are too few to judge a namespace by.
pub const MIN_READS_TO_JUDGE: u64 = 100;

/// Should this request's latency be timed (if it turns out a hit)? A per-thread counter:
/// no shared cache line.
pub(super) fn sample_hit() -> bool {
    thread_local! {
        static TICK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    TICK.with(|t| {
        let n = t.get().wrapping_add(1);
        t.set(n);
        n.is_multiple_of(HIT_SAMPLE)
    })
}

/// What this process saw of a namespace, to hold against its declaration (C4).
pub(super) struct Observed {
    hits: AtomicU64,
    stale: AtomicU64,
    misses: AtomicU64,
    pub(super) invalidations: AtomicU64,
    /// Registered once: the hot path records without building labels or looking them up.
    requests: [metrics::Counter; 3],
    durations: [metrics::Histogram; 3],
}

impl Observed {
    pub(super) fn new(namespace: &str) -> Self {
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
    pub(super) fn record(&self, outcome: Outcome, seconds: Option<f64>) {
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

pub(super) fn describe_metrics() {
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

impl Cache {
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
    pub(super) fn l2_failed(&self, error: &bulwark_kernel::kv::KvError) {
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

    pub(super) fn l2_ok(&self) {
        if self.inner.degraded.swap(false, Ordering::Relaxed) {
            metrics::gauge!("bulwark_cache_degraded").set(0.0);
            tracing::info!(message = "Cache recovered: the shared tier answers again.");
        }
    }

    /// Is the cache degraded (shared tier failing) right now?
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hit_in_hit_sample_is_timed() {
        let timed = (0..HIT_SAMPLE * 100).filter(|_| sample_hit()).count();
        assert_eq!(timed, 100);
    }
}
