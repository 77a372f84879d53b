//! Active invalidation (C7): by key and by tag, broadcast to every instance's L1, and the
//! per-key generations that keep a load overtaken by an invalidation from writing back.

use std::future::Future;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::{BOOKKEEPING_MAX, Cache, CacheError, Outcome};

/// Channel on which invalidations reach every instance's L1.
pub const INVALIDATION_CHANNEL: &str = "cache:invalidate";

fn tag_set(namespace: &str, tag: &str) -> String {
    format!("cache-tag:{namespace}:{tag}")
}

impl Cache {
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

    /// Invalidations of `l1_key` seen so far: a load compares it before and after.
    pub(super) fn generation(&self, l1_key: &str) -> u64 {
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
}
