//! Shared key-value state (K6): values with TTLs, locks, pub/sub and presence.
//!
//! * [`redis::RedisStore`] — Redis via fred (standalone, sentinel or cluster by URL).
//! * [`memory::MemoryStore`] — in-process, for the embedded default (one process).
//!
//! Both pass the conformance suite in `tests/tests/kv_conformance.rs`.

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("key-value store unavailable: {0}")]
    Unavailable(String),
    #[error("key-value store returned an unexpected reply: {0}")]
    Protocol(String),
    #[error("invalid key-value argument: {0}")]
    Invalid(String),
}

/// A held lock. Only the holder (matching `owner`) can extend or release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockGuard {
    pub key: String,
    /// Random per acquisition; proves ownership to `extend`/`release`.
    pub owner: String,
    /// Strictly increasing per lock key across acquisitions: a writer guarded by the lock
    /// passes it along so that a stale holder's late write can be refused.
    pub fencing_token: u64,
}

/// Key-value with TTL, locks with lease and fencing, pub/sub and presence sets.
#[async_trait]
pub trait KvStore: Send + Sync {
    /// `redis` or `memory`.
    fn kind(&self) -> &'static str;

    async fn get(&self, key: &str) -> Result<Option<Bytes>, KvError>;
    /// Set `key`; `ttl` of `None` means no expiry.
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<(), KvError>;
    /// Set only if absent; true when this call set it.
    async fn set_nx(&self, key: &str, value: Bytes, ttl: Option<Duration>)
    -> Result<bool, KvError>;
    /// Delete; true when something was deleted.
    async fn delete(&self, key: &str) -> Result<bool, KvError>;
    /// Remaining time to live; `None` when the key is missing or has no expiry.
    async fn ttl(&self, key: &str) -> Result<Option<Duration>, KvError>;

    /// Try once to take the lock `key` for `lease`; `None` when someone else holds it.
    async fn try_lock(&self, key: &str, lease: Duration) -> Result<Option<LockGuard>, KvError>;
    /// Extend a held lock; false when the lease was lost (expired or taken by another).
    async fn extend_lock(&self, guard: &LockGuard, lease: Duration) -> Result<bool, KvError>;
    /// Release a held lock; false when it was no longer ours (compare-and-delete).
    async fn release_lock(&self, guard: &LockGuard) -> Result<bool, KvError>;
    /// The current fencing token of `key` (the last one handed out), 0 if never locked.
    async fn current_fencing_token(&self, key: &str) -> Result<u64, KvError>;

    /// Publish to every subscriber of `channel` (at most once).
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), KvError>;
    /// Subscribe to `channel`. The stream survives reconnects of the underlying client.
    async fn subscribe(&self, channel: &str) -> Result<BoxStream<'static, Bytes>, KvError>;

    /// Add or refresh `member` in presence set `set`; it disappears after `ttl` unless refreshed.
    async fn presence_heartbeat(
        &self,
        set: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<(), KvError>;
    async fn presence_remove(&self, set: &str, member: &str) -> Result<(), KvError>;
    /// Live members (expired ones are not returned), sorted.
    async fn presence_members(&self, set: &str) -> Result<Vec<String>, KvError>;

    /// Is the store reachable right now?
    async fn health(&self) -> Result<(), KvError>;
    /// Memory used and configured limit in bytes, when the store knows them (Redis INFO).
    async fn memory(&self) -> Result<(u64, Option<u64>), KvError>;

    /// Keys the store removed on its own since it started: `(evicted for memory, expired)`,
    /// when it counts them (Redis INFO `evicted_keys`, `expired_keys`); `None` otherwise.
    async fn removals(&self) -> Result<Option<(u64, u64)>, KvError> {
        Ok(None)
    }
}

/// Build the configured store: Redis when `cfg.url` is set, else the in-process store.
///
/// Never fails because Redis is unreachable: the Redis client connects in the background.
pub async fn from_config(
    cfg: &crate::config::RedisConfig,
) -> Result<std::sync::Arc<dyn KvStore>, KvError> {
    match cfg.url {
        Some(_) => Ok(std::sync::Arc::new(redis::RedisStore::connect(cfg).await?)),
        None => Ok(std::sync::Arc::new(memory::MemoryStore::new())),
    }
}

/// Both stores reject the same arguments, so that code passing on one passes on the other.
fn check_name(what: &str, name: &str) -> Result<(), KvError> {
    if name.is_empty() {
        return Err(KvError::Invalid(format!("empty {what}")));
    }
    Ok(())
}

/// Whole milliseconds of a TTL or lease (sub-millisecond rounds up); zero is refused
/// because Redis refuses it.
fn ttl_millis(d: Duration) -> Result<u64, KvError> {
    if d.is_zero() {
        return Err(KvError::Invalid("zero TTL or lease".to_owned()));
    }
    let ms = d.as_millis().max(1);
    // Redis takes signed 64-bit milliseconds; anything larger is a caller bug.
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms <= i64::MAX as u64 / 2)
        .ok_or_else(|| KvError::Invalid("TTL or lease too large".to_owned()))
}

/// Count an error of `store`/`op` (a fixed, low-cardinality label set).
fn count_error<T>(
    store: &'static str,
    op: &'static str,
    result: Result<T, KvError>,
) -> Result<T, KvError> {
    if result.is_err() {
        metrics::counter!("bulwark_kv_errors_total", "store" => store, "op" => op).increment(1);
    }
    result
}
