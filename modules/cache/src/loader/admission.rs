//! Admission by `min_uses` (like nginx `proxy_cache_min_uses`): a key is stored only once it
//! was requested often enough within its window in this process.

use super::clock::now_ms;
use super::{BOOKKEEPING_MAX, Cache};
use crate::config::NamespacePolicy;

impl Cache {
    /// Count one request of `l1_key` for admission; returns the count in the current window.
    pub(super) fn count_use(&self, l1_key: &str, policy: &NamespacePolicy) -> u32 {
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

    pub(super) fn admitted(&self, l1_key: &str, policy: &NamespacePolicy) -> bool {
        if policy.min_uses <= 1 {
            return true;
        }
        let uses = self.inner.uses.lock().unwrap_or_else(|p| p.into_inner());
        uses.get(l1_key).is_some_and(|(_, c)| *c >= policy.min_uses)
    }
}
