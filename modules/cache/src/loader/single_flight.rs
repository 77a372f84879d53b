//! Work on one key shared by every concurrent caller in this process: one load, one answer per
//! key, each in its own task so that a caller that goes away cancels nothing.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

use super::entry::Entry;
use super::{Cache, CacheError, CacheState, Req};

/// Work on one key that concurrent callers share (see `Cache::join_or_start`).
pub(super) type SharedWork<T> = Shared<BoxFuture<'static, Result<T, CacheError>>>;
/// Callers of one piece of shared work, by key.
pub(super) type WorkMap<T> = Mutex<HashMap<String, SharedWork<T>>>;

impl Cache {
    /// The shared future of `key` in the map `pick` selects, or a new one running `work` in its
    /// own task: callers join it, a cancelled caller does not cancel it, and the task removes
    /// itself from the map when done even if every caller went away.
    pub(super) fn join_or_start<T, W, Fut>(
        &self,
        pick: fn(&CacheState) -> &WorkMap<T>,
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

    /// One load per key per process; the load runs in its own task. `fence` is the fill or
    /// refresh lock's key and fencing token, when one is held.
    pub(super) async fn single_flight<F, Fut>(
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
}
