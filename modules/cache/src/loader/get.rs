//! The read path: `get_or_load` — the L1 fast path (one namespace lookup, no key string, the
//! coarse clock, sampled timing), then L2, then the refresh or fill decisions.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::entry::{Entry, xfetch_should_refresh};
use super::l1::KeyRef;
use super::observe::sample_hit;
use super::{Cache, CacheError, Outcome, Req};
use crate::config::Strategy;

impl Cache {
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
                    self.refresh_in_background(&req, &e, loader);
                }
                Ok((e.value.clone(), Outcome::Hit))
            }
            Some(e) if policy.strategy == Strategy::Swr => {
                self.refresh_in_background(&req, &e, loader);
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
}
