//! In-process [`KvStore`] for the embedded default: same semantics as Redis within one process.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{KvError, KvStore, LockGuard, check_name, count_error, ttl_millis};

const STORE: &str = "memory";
/// Sweep expired entries every this many writes, so keys never read again do not pile up.
const SWEEP_EVERY: u64 = 1024;
/// Per-channel buffer; a subscriber lagging further behind loses messages (at most once).
const CHANNEL_CAPACITY: usize = 1024;

struct Entry {
    value: Bytes,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

struct Lock {
    owner: String,
    expires: Instant,
}

#[derive(Default)]
struct State {
    kv: HashMap<String, Entry>,
    locks: HashMap<String, Lock>,
    /// Fencing counters outlive their locks (as the `:fence` keys do in Redis) to stay monotonic.
    fences: HashMap<String, u64>,
    /// set -> member -> expiry.
    presence: HashMap<String, HashMap<String, Instant>>,
    /// Bytes of keys and values in `kv`, kept up to date so `memory()` is O(1).
    bytes: u64,
    writes: u64,
}

impl State {
    fn insert(&mut self, key: &str, entry: Entry) {
        self.bytes += (key.len() + entry.value.len()) as u64;
        if let Some(old) = self.kv.insert(key.to_owned(), entry) {
            self.bytes = self
                .bytes
                .saturating_sub((key.len() + old.value.len()) as u64);
        }
    }

    fn remove(&mut self, key: &str) -> Option<Entry> {
        let old = self.kv.remove(key)?;
        self.bytes = self
            .bytes
            .saturating_sub((key.len() + old.value.len()) as u64);
        Some(old)
    }

    /// The live entry at `key`, dropping it first if it has expired.
    fn live(&mut self, key: &str, now: Instant) -> Option<&Entry> {
        if self.kv.get(key).is_some_and(|e| !e.live(now)) {
            self.remove(key);
        }
        self.kv.get(key)
    }

    fn wrote(&mut self, now: Instant) {
        self.writes += 1;
        if self.writes.is_multiple_of(SWEEP_EVERY) {
            self.sweep(now);
        }
    }

    fn sweep(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .kv
            .iter()
            .filter(|(_, e)| !e.live(now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.remove(&key);
        }
        self.locks.retain(|_, l| l.expires > now);
        self.presence.retain(|_, members| {
            members.retain(|_, at| *at > now);
            !members.is_empty()
        });
    }
}

/// The in-process store. Cheap critical sections under one std mutex; never held across `.await`.
pub struct MemoryStore {
    state: Mutex<State>,
    channels: Mutex<HashMap<String, broadcast::Sender<Bytes>>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that matters
        // more than losing the whole store, so keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn channels(&self) -> MutexGuard<'_, HashMap<String, broadcast::Sender<Bytes>>> {
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_inner(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        nx: bool,
    ) -> Result<bool, KvError> {
        check_name("key", key)?;
        let now = Instant::now();
        let expires = ttl.map(|ttl| deadline(now, ttl)).transpose()?;
        let mut st = self.state();
        if nx && st.live(key, now).is_some() {
            return Ok(false);
        }
        st.insert(key, Entry { value, expires });
        st.wrote(now);
        Ok(true)
    }
}

/// `now + ttl`, validated the same way as for Redis.
fn deadline(now: Instant, ttl: Duration) -> Result<Instant, KvError> {
    let ms = ttl_millis(ttl)?;
    now.checked_add(Duration::from_millis(ms))
        .ok_or_else(|| KvError::Invalid("TTL or lease too large".to_owned()))
}

#[async_trait]
impl KvStore for MemoryStore {
    fn kind(&self) -> &'static str {
        STORE
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, KvError> {
        check_name("key", key)?;
        let now = Instant::now();
        Ok(self.state().live(key, now).map(|e| e.value.clone()))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<(), KvError> {
        count_error(
            STORE,
            "set",
            self.set_inner(key, value, ttl, false).map(|_| ()),
        )
    }

    async fn set_nx(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<bool, KvError> {
        count_error(STORE, "set", self.set_inner(key, value, ttl, true))
    }

    async fn delete(&self, key: &str) -> Result<bool, KvError> {
        check_name("key", key)?;
        let now = Instant::now();
        let mut st = self.state();
        Ok(st.remove(key).is_some_and(|e| e.live(now)))
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>, KvError> {
        check_name("key", key)?;
        let now = Instant::now();
        Ok(self
            .state()
            .live(key, now)
            .and_then(|e| e.expires)
            .map(|at| at.saturating_duration_since(now)))
    }

    async fn try_lock(&self, key: &str, lease: Duration) -> Result<Option<LockGuard>, KvError> {
        check_name("lock key", key)?;
        let now = Instant::now();
        let expires = deadline(now, lease)?;
        let mut st = self.state();
        if st.locks.get(key).is_some_and(|l| l.expires > now) {
            return Ok(None);
        }
        let owner = uuid::Uuid::new_v4().simple().to_string();
        st.locks.insert(
            key.to_owned(),
            Lock {
                owner: owner.clone(),
                expires,
            },
        );
        let fence = st.fences.entry(key.to_owned()).or_insert(0);
        *fence += 1;
        let fencing_token = *fence;
        st.wrote(now);
        Ok(Some(LockGuard {
            key: key.to_owned(),
            owner,
            fencing_token,
        }))
    }

    async fn extend_lock(&self, guard: &LockGuard, lease: Duration) -> Result<bool, KvError> {
        let now = Instant::now();
        let expires = deadline(now, lease)?;
        let mut st = self.state();
        match st.locks.get_mut(&guard.key) {
            Some(l) if l.owner == guard.owner && l.expires > now => {
                l.expires = expires;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release_lock(&self, guard: &LockGuard) -> Result<bool, KvError> {
        let now = Instant::now();
        let mut st = self.state();
        match st.locks.get(&guard.key) {
            Some(l) if l.owner == guard.owner && l.expires > now => {
                st.locks.remove(&guard.key);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn current_fencing_token(&self, key: &str) -> Result<u64, KvError> {
        check_name("lock key", key)?;
        Ok(self.state().fences.get(key).copied().unwrap_or(0))
    }

    async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), KvError> {
        check_name("channel", channel)?;
        let mut channels = self.channels();
        if let Some(tx) = channels.get(channel) {
            // An error only means nobody listens any more: forget the channel.
            if tx.send(payload).is_err() {
                channels.remove(channel);
            }
        }
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<BoxStream<'static, Bytes>, KvError> {
        check_name("channel", channel)?;
        let rx = {
            let mut channels = self.channels();
            channels.retain(|_, tx| tx.receiver_count() > 0);
            channels
                .entry(channel.to_owned())
                .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
                .subscribe()
        };
        let stream = stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(payload) => return Some((payload, rx)),
                    // At most once: a slow subscriber skips what it missed.
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            skipped = n,
                            "memory kv subscriber lagged; messages dropped"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn presence_heartbeat(
        &self,
        set: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<(), KvError> {
        check_name("presence set", set)?;
        check_name("presence member", member)?;
        let now = Instant::now();
        let expires = count_error(STORE, "presence", deadline(now, ttl))?;
        let mut st = self.state();
        st.presence
            .entry(set.to_owned())
            .or_default()
            .insert(member.to_owned(), expires);
        st.wrote(now);
        Ok(())
    }

    async fn presence_remove(&self, set: &str, member: &str) -> Result<(), KvError> {
        check_name("presence set", set)?;
        let mut st = self.state();
        if let Some(members) = st.presence.get_mut(set) {
            members.remove(member);
            if members.is_empty() {
                st.presence.remove(set);
            }
        }
        Ok(())
    }

    async fn presence_members(&self, set: &str) -> Result<Vec<String>, KvError> {
        check_name("presence set", set)?;
        let now = Instant::now();
        let mut st = self.state();
        let Some(members) = st.presence.get_mut(set) else {
            return Ok(Vec::new());
        };
        members.retain(|_, at| *at > now);
        let mut live: Vec<String> = members.keys().cloned().collect();
        if live.is_empty() {
            st.presence.remove(set);
        }
        drop(st);
        live.sort();
        Ok(live)
    }

    async fn health(&self) -> Result<(), KvError> {
        Ok(())
    }

    async fn memory(&self) -> Result<(u64, Option<u64>), KvError> {
        Ok((self.state().bytes, None))
    }
}
