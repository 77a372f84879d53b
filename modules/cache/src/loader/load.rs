//! Running the loader: the new entry's jittered expiry, the guarded write-back to both tiers,
//! and the memory of recent loader failures (`error_ttl`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::clock::now_ms;
use super::entry::{Entry, jittered};
use super::{BOOKKEEPING_MAX, Cache, CacheError, Req};
use crate::config::NamespacePolicy;

impl Cache {
    /// Run `loader` and write its value back to L2 and L1 — unless it is too large, not yet
    /// admitted, overtaken by an invalidation or fenced out (`fence`: lock key and token).
    pub(super) async fn load<F, Fut>(
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

    /// A failure of `l1_key`'s loader still remembered at `now`.
    pub(super) fn recent_error(&self, l1_key: &str, now: u64) -> Option<String> {
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
}
