//! The in-process tier (L1): moka caches bounded in bytes, expiring each entry at its hard
//! expiry, looked up by the key's parts so a hit builds no string.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::clock::now_ms;
use super::entry::Entry;

/// Bytes an L1 entry costs beyond its key and value: moka's node, hash and expiry bookkeeping,
/// the `Entry` and its `Arc`, allocator rounding. Calibrated with `scripts/bench-cache`
/// (benchmark 5: 1M entries, RSS growth vs accounted bytes), so `l1_max_bytes` bounds real memory.
const ENTRY_OVERHEAD_BYTES: usize = 512;

/// An L1 key, `namespace:key` (namespace names never contain `:`). Looked up through
/// [`KeyRef`], so a hit on the fast path builds no string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct L1Key(String);

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
pub(super) struct KeyRef<'a> {
    pub(super) namespace: &'a str,
    pub(super) key: &'a str,
}

impl std::hash::Hash for KeyRef<'_> {
    /// The key alone, in one write: equal keys of two namespaces share a hash (rare, and
    /// settled by equality), and the hit path hashes once.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.key.as_bytes());
    }
}

impl<'a> KeyRef<'a> {
    pub(super) fn parse(l1_key: &'a str) -> Self {
        let (namespace, key) = l1_key.split_once(':').unwrap_or(("", l1_key));
        Self { namespace, key }
    }
}

impl moka::Equivalent<L1Key> for KeyRef<'_> {
    fn equivalent(&self, key: &L1Key) -> bool {
        *self == key.parts()
    }
}

pub(super) type L1Cache = moka::future::Cache<L1Key, Arc<Entry>>;

/// The in-process tier: one bounded moka cache per namespace with an `l1_share`, one shared by
/// the others, so a busy namespace cannot evict a small, hot one.
pub(super) struct L1 {
    pub(super) shares: BTreeMap<String, L1Cache>,
    pub(super) rest: L1Cache,
}

impl L1 {
    /// The cache holding `namespace`'s keys.
    pub(super) fn of(&self, namespace: &str) -> &L1Cache {
        self.shares.get(namespace).unwrap_or(&self.rest)
    }

    pub(super) async fn get(&self, key: KeyRef<'_>) -> Option<Arc<Entry>> {
        self.of(key.namespace).get(&key).await
    }

    pub(super) async fn insert(&self, l1_key: &str, entry: Arc<Entry>) {
        let k = KeyRef::parse(l1_key);
        self.of(k.namespace)
            .insert(L1Key(l1_key.to_owned()), entry)
            .await;
    }

    pub(super) async fn invalidate(&self, l1_key: &str) {
        let k = KeyRef::parse(l1_key);
        self.of(k.namespace).invalidate(&k).await;
    }

    pub(super) fn all(&self) -> impl Iterator<Item = &L1Cache> {
        self.shares.values().chain(std::iter::once(&self.rest))
    }
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

pub(super) fn build_l1(capacity: u64) -> L1Cache {
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
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
}
