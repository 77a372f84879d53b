//! Who loads a missing or stale key: the fill lock (strategy `lock`, C3) with its wait,
//! takeover and fallback; the background refresh (swr and XFetch, C2) under a refresh lock;
//! and the one sequence both run once they hold a lock (`load_holding`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark_kernel::kv::LockGuard;
use bytes::Bytes;

use super::clock::now_ms;
use super::entry::Entry;
use super::l1::KeyRef;
use super::{Cache, CacheError, Outcome, Req};
use crate::config::{Fallback, Strategy};

/// A loaded or looked-up entry as the answer to a miss.
fn miss(e: Arc<Entry>) -> (Bytes, Outcome) {
    (e.value.clone(), Outcome::Miss)
}

impl Cache {
    /// [`Cache::fill`] once per key per process: concurrent misses join the first one's
    /// answer (and its wait for another instance's fill) instead of each polling the store.
    pub(super) async fn answer_once<F, Fut>(
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

    /// Refresh `refreshing` (a stale or XFetch-due entry) in the background, once per cluster:
    /// whoever takes the refresh lock refreshes; the rest keep serving what they have.
    pub(super) fn refresh_in_background<F, Fut>(
        &self,
        req: &Arc<Req>,
        refreshing: &Arc<Entry>,
        loader: F,
    ) where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        let this = self.clone();
        let (req, refreshing) = (req.clone(), refreshing.clone());
        tokio::spawn(async move {
            let lock_key = format!("cache-refresh:{}:{}", req.namespace, req.l1_key);
            match this
                .inner
                .kv
                .try_lock(&lock_key, req.policy.lock_lease)
                .await
            {
                Ok(Some(guard)) => {
                    let _ = this
                        .load_holding(&req, guard, Some(&refreshing), loader)
                        .await;
                }
                Ok(None) => {}
                // The store is down: refresh locally (single-flight still holds).
                Err(_) => {
                    let _ = this.single_flight(&req, loader, None).await;
                }
            }
        });
    }

    /// Holding `guard` (a fill or refresh lock): look in L2 once more — the previous holder may
    /// have filled and released just before we took it — else load, fenced by the lock's
    /// token; release the lock either way. `replacing` is the entry a refresh replaces: L2
    /// still holding it is not someone else's fill.
    async fn load_holding<F, Fut>(
        &self,
        req: &Arc<Req>,
        guard: LockGuard,
        replacing: Option<&Entry>,
        loader: F,
    ) -> Result<Arc<Entry>, CacheError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, String>> + Send + 'static,
    {
        let r = match self.fresh_in_l2(req, replacing).await {
            Some(e) => Ok(e),
            None => {
                let fence = (guard.key.clone(), guard.fencing_token);
                self.single_flight(req, loader, Some(fence)).await
            }
        };
        let _ = self.inner.kv.release_lock(&guard).await;
        r
    }

    /// Answer a miss (or a stale entry under strategy `lock`): load, or wait for the instance
    /// that holds the fill lock and take what it wrote.
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
            return Ok(miss(e));
        }
        if req.policy.strategy == Strategy::Swr {
            return self.single_flight(req, loader, None).await.map(miss);
        }
        if !self.admitted(&req.l1_key, &req.policy) {
            // Not stored anyway (admission): no one waits for it, load locally.
            return self.single_flight(req, loader, None).await.map(miss);
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
            Ok(Some(guard)) => self.load_holding(req, guard, None, loader).await.map(miss),
            Ok(None) => {
                let waited = Instant::now();
                let record_wait = || {
                    metrics::histogram!("bulwark_cache_lock_wait_seconds", "namespace" => req.namespace.to_owned())
                        .record(waited.elapsed().as_secs_f64());
                };
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
                        record_wait();
                        return self.load_holding(req, guard, None, loader).await.map(miss);
                    }
                    if let Some(e) = self.fresh_in_l2(req, None).await {
                        record_wait();
                        return Ok(miss(e));
                    }
                }
                metrics::counter!("bulwark_cache_lock_timeouts_total", "namespace" => req.namespace.to_owned()).increment(1);
                match (req.policy.fallback, stale) {
                    (Fallback::Stale, Some(e)) => Ok((e.value.clone(), Outcome::Stale)),
                    (Fallback::Unavailable, _) => Err(CacheError::Unavailable(format!(
                        "no value for `{}` within lock_wait",
                        req.l1_key
                    ))),
                    _ => self.single_flight(req, loader, None).await.map(miss),
                }
            }
            // The shared store is down: protect the database per process (single-flight).
            Err(_) => self.single_flight(req, loader, None).await.map(miss),
        }
    }

    /// A fresh entry for the key in L2 other than `replacing` (copied into L1 when the
    /// namespace keeps one).
    async fn fresh_in_l2(&self, req: &Req, replacing: Option<&Entry>) -> Option<Arc<Entry>> {
        let raw = self.inner.kv.get(&req.l2_key).await.ok()??;
        let e =
            Entry::decode(raw).filter(|e| now_ms() < e.soft_expires_ms && replacing != Some(e))?;
        let e = Arc::new(e);
        if req.policy.l1 {
            self.inner.l1.insert(&req.l1_key, e.clone()).await;
        }
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bulwark_kernel::kv::KvStore;
    use bulwark_kernel::kv::memory::MemoryStore;

    use super::*;
    use crate::config::{CacheConfig, NamespacePolicy};

    /// One swr namespace `ns`, no jitter; the rest of the policy from the config's defaults.
    fn swr_config(ttl: &str) -> CacheConfig {
        let policy: NamespacePolicy = serde_json::from_value(serde_json::json!({
            "class": "expensive", "reason": "test", "ttl": ttl, "jitter": 0.0, "strategy": "swr",
        }))
        .expect("policy");
        CacheConfig {
            namespaces: [("ns".to_owned(), policy)].into(),
            ..CacheConfig::default()
        }
    }

    /// Counts its runs and answers `value`.
    fn loader(
        runs: &Arc<AtomicUsize>,
        value: &'static str,
    ) -> impl FnOnce() -> futures::future::Ready<Result<Bytes, String>> + Send + 'static {
        let runs = runs.clone();
        move || {
            runs.fetch_add(1, Ordering::SeqCst);
            futures::future::ready(Ok(Bytes::from_static(value.as_bytes())))
        }
    }

    /// Wait (up to 2 s) for a background refresh to bring `runs` to `n`.
    async fn runs_reach(runs: &AtomicUsize, n: usize) {
        for _ in 0..200 {
            if runs.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_refresh_after_another_instances_refresh_takes_its_value() {
        let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
        let cfg = swr_config("400ms");
        let (a, b) = (Cache::new(&cfg, store.clone()), Cache::new(&cfg, store));
        let runs = Arc::new(AtomicUsize::new(0));
        a.get_or_load("ns", "k", loader(&runs, "old"))
            .await
            .expect("a");
        let (_, o) = b
            .get_or_load("ns", "k", loader(&runs, "x"))
            .await
            .expect("b");
        assert_eq!(
            (o, runs.load(Ordering::SeqCst)),
            (Outcome::Hit, 1),
            "b read A's fill from L2"
        );
        tokio::time::sleep(Duration::from_millis(450)).await;

        // Both L1s hold the stale entry; A refreshes first and releases the refresh lock.
        let (v, o) = a
            .get_or_load("ns", "k", loader(&runs, "new"))
            .await
            .expect("a stale");
        assert_eq!((v.as_ref(), o), (b"old".as_ref(), Outcome::Stale));
        runs_reach(&runs, 2).await;
        tokio::time::sleep(Duration::from_millis(20)).await;

        // B's refresh takes the free lock, finds A's fresh value in L2 and does not load.
        let (_, o) = b
            .get_or_load("ns", "k", loader(&runs, "again"))
            .await
            .expect("b stale");
        assert_eq!(o, Outcome::Stale);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "one refresh across both instances"
        );
        let (v, o) = b
            .get_or_load("ns", "k", loader(&runs, "y"))
            .await
            .expect("b after");
        assert_eq!(
            (v.as_ref(), o),
            (b"new".as_ref(), Outcome::Hit),
            "B's L1 took A's value"
        );
    }

    #[tokio::test]
    async fn an_early_refresh_still_loads_when_l2_holds_the_entry_it_replaces() {
        let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
        let cache = Cache::new(&swr_config("60s"), store);
        let runs = Arc::new(AtomicUsize::new(0));
        cache
            .get_or_load("ns", "k", loader(&runs, "old"))
            .await
            .expect("load");
        let req = Arc::new(Req {
            namespace: "ns".into(),
            l1_key: "ns:k".into(),
            l2_key: "cache:ns:k".into(),
            policy: cache.namespace("ns").expect("ns").policy.clone(),
        });
        let current = cache
            .inner
            .l1
            .get(KeyRef::parse("ns:k"))
            .await
            .expect("in L1");
        // What XFetch does with a fresh entry: L2 still holds that very entry.
        cache.refresh_in_background(&req, &current, loader(&runs, "new"));
        runs_reach(&runs, 2).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "the refresh loaded");
    }
}
