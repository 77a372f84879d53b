//! [`KvStore`] on Redis via fred: standalone, sentinel or cluster, chosen by the URL scheme.
//!
//! The process starts while Redis is down: `connect` never fails on an unreachable server.
//! Commands fail fast with [`KvError::Unavailable`] while disconnected, and the client keeps
//! reconnecting in the background (subscriptions are restored on every reconnect).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
/// Re-exported so tests can drive a raw client of exactly the same version.
pub use fred;
use fred::clients::{SubscriberClient, WithOptions};
use fred::prelude::*;
use fred::types::InfoKind;
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::{Mutex, Notify, broadcast};
use tokio::time::Instant;

use super::{KvError, KvStore, LockGuard, check_name, count_error, ttl_millis};
use crate::config::RedisConfig;

const STORE: &str = "redis";
/// Pause between SUBSCRIBE retries while connected.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// `SET key owner NX PX lease` and, only when it succeeded, `INCR key:fence` — atomically, so
/// a token is never handed out without the lock nor the lock without a token. 0 = not acquired.
const LOCK_ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0";

/// Compare-and-pexpire: only the holder (same owner) may extend.
const LOCK_EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Compare-and-delete: only the holder (same owner) may release.
const LOCK_RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Score = expiry in ms on the *server's* clock, so processes with skewed clocks agree. The set
/// itself expires with its longest-lived member so abandoned sets vanish.
const PRESENCE_HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', tonumber(top[2])))
return 1";

/// Drop expired members, return the live ones.
const PRESENCE_MEMBERS: &str = r"
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')";

/// Channels wanted by live subscription streams, with the number of streams per channel.
type Wanted = Arc<Mutex<HashMap<String, usize>>>;

/// The store's connections (command client, fail-fast view, subscriber) and what keeps the
/// subscriptions alive.
struct RedisClients {
    raw: Client,
    /// Fail-fast view of the client: errors at once while disconnected instead of queueing.
    client: WithOptions<Client>,
    subscriber: SubscriberClient,
    wanted: Wanted,
    /// Wakes `keep_subscribed` after a SUBSCRIBE failed.
    retry: Arc<Notify>,
    prefix: String,
    timeout: Duration,
    /// A channel only this store subscribes to: publishing a nonce on it and seeing it come
    /// back proves the subscriber connection is live and carries every wanted channel.
    probe: String,
}

impl Drop for RedisClients {
    fn drop(&mut self) {
        // Stop the background reconnect loops of a store nobody uses any more.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (client, subscriber, timeout) =
                (self.raw.clone(), self.subscriber.clone(), self.timeout);
            rt.spawn(async move {
                let _ = tokio::time::timeout(timeout, client.quit()).await;
                let _ = tokio::time::timeout(timeout, subscriber.quit()).await;
            });
        }
    }
}

/// Redis-backed store. Cheap to share behind an `Arc<dyn KvStore>`.
pub struct RedisStore {
    inner: Arc<RedisClients>,
}

impl RedisStore {
    /// Build the clients and start connecting in the background. Fails only on a bad
    /// configuration (URL, zero timeout), never because Redis is unreachable.
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, KvError> {
        let url = cfg
            .url
            .as_ref()
            .ok_or_else(|| KvError::Invalid("redis.url is not set".to_owned()))?;
        if cfg.command_timeout.is_zero() {
            return Err(KvError::Invalid(
                "redis.command_timeout must be positive".to_owned(),
            ));
        }
        let timeout = cfg.command_timeout;
        // The URL may carry a password: never echo it.
        let mut config = Config::from_url(url.expose()).map_err(|e| {
            KvError::Invalid(format!("redis.url ({}): {}", url.redacted(), e.details()))
        })?;
        // Run the reconnect policy on the first connection too, instead of failing start-up.
        config.fail_fast = false;

        let mut policy = ReconnectPolicy::new_exponential(0, 50, 5_000, 2);
        policy.set_jitter(50);
        let mut builder = Builder::from_config(config);
        builder
            .set_policy(policy)
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
                p.broadcast_channel_capacity = 1024;
            });
        let client = builder
            .build()
            .map_err(|e| KvError::Invalid(format!("redis client: {}", e.details())))?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| KvError::Invalid(format!("redis subscriber client: {}", e.details())))?;

        // Listen before connecting so no event of the first attempt is missed.
        let (client_errors, subscriber_errors) = (client.error_rx(), subscriber.error_rx());
        let mut reconnects = subscriber.reconnect_rx();
        // Detached on purpose: the tasks run until `quit` (see `Drop for RedisClients`).
        drop(client.connect());
        drop(subscriber.connect());

        // Give a reachable server a moment so the first commands do not fail spuriously, but
        // return as soon as a connection attempt fails: Redis being down must not block start-up.
        wait_first_attempt(&client, client_errors, timeout).await;
        wait_first_attempt(&subscriber, subscriber_errors, timeout).await;
        // Nothing is subscribed yet, so the first connection's event needs no resubscribe; a
        // redundant SUBSCRIBE racing the caller's first ones is only a risk.
        while reconnects.try_recv().is_ok() {}
        let probe = format!(
            "{}__subscriber-probe:{}",
            cfg.key_prefix,
            uuid::Uuid::new_v4().simple()
        );
        // Always wanted, so every (re)subscription carries it along with the real channels.
        let wanted: Wanted = Arc::new(Mutex::new(HashMap::from([(probe.clone(), 1)])));
        let retry = Arc::new(Notify::new());
        tokio::spawn(keep_subscribed(
            subscriber.clone(),
            reconnects,
            wanted.clone(),
            retry.clone(),
            timeout,
        ));

        let fast = client.with_options(&Options {
            fail_fast: true,
            timeout: Some(timeout),
            ..Options::default()
        });
        Ok(Self {
            inner: Arc::new(RedisClients {
                raw: client,
                client: fast,
                subscriber,
                wanted,
                retry,
                prefix: cfg.key_prefix.clone(),
                timeout,
                probe,
            }),
        })
    }

    /// Publish nonces on the probe channel until one comes back through the subscriber
    /// (re-sending SUBSCRIBE for every wanted channel between attempts), or the timeout passes.
    async fn confirm_subscribed(&self, wanted: &HashMap<String, usize>) -> bool {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.timeout;
        let channels: Vec<String> = wanted.keys().cloned().collect();
        let mut attempt = 0u32;
        while Instant::now() < deadline {
            let mut rx = inner.subscriber.message_rx();
            let nonce = uuid::Uuid::new_v4().simple().to_string();
            if attempt > 0 {
                let _ = timed(inner.timeout, inner.subscriber.subscribe(channels.clone())).await;
            }
            attempt += 1;
            let sent = timed(
                inner.timeout,
                inner
                    .raw
                    .publish::<Value, _, _>(inner.probe.clone(), nonce.clone()),
            )
            .await;
            if sent.is_err() {
                return false;
            }
            let wait = Duration::from_millis(250 * u64::from(attempt.min(4)));
            let got = tokio::time::timeout(wait, async {
                loop {
                    match rx.recv().await {
                        Ok(m) if *m.channel == *inner.probe => {
                            if bytes(m.value).is_some_and(|b| b.as_ref() == nonce.as_bytes()) {
                                return true;
                            }
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return false,
                    }
                }
            })
            .await;
            if got == Ok(true) {
                return true;
            }
        }
        false
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.prefix)
    }

    /// The lock key and its fencing counter, hash-tagged into one cluster slot because one
    /// script touches both. Locks live apart from plain keys so `get("x")` never sees a lock.
    fn lock_keys(&self, key: &str) -> (String, String) {
        let lock = format!("{{{}lock:{key}}}", self.inner.prefix);
        let fence = format!("{lock}:fence");
        (lock, fence)
    }

    /// Run one command on `client`, mapping fred errors. The command timeout is the client's
    /// own (`Options::timeout`): a second, tokio-side timer per command cost ~6% of a GET round
    /// trip (measured by the L2 layer breakdown in docs/benchmarks.md).
    async fn cmd<T>(&self, fut: impl Future<Output = Result<T, Error>>) -> Result<T, KvError> {
        fut.await.map_err(map_error)
    }

    /// Record duration and errors of one trait operation.
    async fn observe<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, KvError>>,
    ) -> Result<T, KvError> {
        let start = Instant::now();
        let result = fut.await;
        metrics::histogram!("bulwark_kv_command_duration_seconds", "store" => STORE)
            .record(start.elapsed().as_secs_f64());
        count_error(STORE, op, result)
    }

    async fn eval(
        &self,
        script: &'static str,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, KvError> {
        self.cmd(self.inner.client.eval::<Value, _, _, _>(script, keys, args))
            .await
    }

    async fn set_inner(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        nx: bool,
    ) -> Result<bool, KvError> {
        check_name("key", key)?;
        let expire = ttl
            .map(ttl_millis)
            .transpose()?
            .map(|ms| Expiration::PX(ms as i64));
        let options = nx.then_some(SetOptions::NX);
        let reply = self
            .cmd(self.inner.client.set::<Value, _, _>(
                self.key(key),
                Value::Bytes(value),
                expire,
                options,
                false,
            ))
            .await?;
        match reply {
            Value::Null => Ok(false),
            Value::String(s) if &*s == "OK" => Ok(true),
            other => Err(unexpected("SET", &other)),
        }
    }
}

async fn timed<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, Error>>,
) -> Result<T, KvError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result.map_err(map_error),
        Err(_) => Err(KvError::Unavailable(format!(
            "command timed out after {timeout:?}"
        ))),
    }
}

/// Poll until the client is connected, a connection attempt failed, or `limit` passed.
async fn wait_first_attempt<C: ClientLike + EventInterface>(
    client: &C,
    mut errors: broadcast::Receiver<(Error, Option<Server>)>,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    while !client.is_connected() && Instant::now() < deadline {
        match errors.try_recv() {
            Ok((error, _)) => {
                tracing::warn!(error = %error, "redis is not reachable yet; reconnecting in the background");
                return;
            }
            Err(broadcast::error::TryRecvError::Empty) => {}
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Re-issue SUBSCRIBE for every wanted channel whenever the subscriber (re)connects, and when a
/// SUBSCRIBE failed (`retry`), until it takes. This covers channels whose first SUBSCRIBE never
/// succeeded, which fred's `manage_subscriptions` would not restore.
async fn keep_subscribed(
    subscriber: SubscriberClient,
    mut reconnects: broadcast::Receiver<Server>,
    wanted: Wanted,
    retry: Arc<Notify>,
    timeout: Duration,
) {
    loop {
        tokio::select! {
            event = reconnects.recv() => {
                // Closed: the client quit.
                if let Err(broadcast::error::RecvError::Closed) = event {
                    return;
                }
            }
            () = retry.notified() => {}
        }
        loop {
            let result = {
                // Held across SUBSCRIBE so a concurrent last-unsubscribe cannot be undone by a stale list.
                let wanted = wanted.lock().await;
                let channels: Vec<String> = wanted.keys().cloned().collect();
                if channels.is_empty() {
                    break;
                }
                // Not fail-fast: a reconnect event fires while the connection is still being set up.
                timed(timeout, subscriber.subscribe(channels)).await
            };
            match result {
                Ok(()) => break,
                // Disconnected: the next reconnect event brings us back here.
                Err(error) if !subscriber.is_connected() => {
                    tracing::warn!(error = %error, "redis resubscribe failed; retrying on reconnect");
                    break;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "redis resubscribe failed; retrying");
                    tokio::time::sleep(RESUBSCRIBE_DELAY).await;
                }
            }
        }
    }
}

/// Keeps a channel subscribed while a stream for it is alive.
struct Subscription {
    store: Arc<RedisClients>,
    channel: String,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, channel) = (self.store.clone(), std::mem::take(&mut self.channel));
        rt.spawn(async move {
            // Under the same lock as subscribe, so a concurrent new subscriber is never cut off.
            let mut wanted = store.wanted.lock().await;
            let Some(count) = wanted.get_mut(&channel) else {
                return;
            };
            *count = count.saturating_sub(1);
            if *count == 0 {
                wanted.remove(&channel);
                let _ = timed(store.timeout, store.subscriber.unsubscribe(channel)).await;
            }
        });
    }
}

fn map_error(e: Error) -> KvError {
    let details = e.details().to_owned();
    match e.kind() {
        ErrorKind::IO
        | ErrorKind::Canceled
        | ErrorKind::Timeout
        | ErrorKind::Backpressure
        | ErrorKind::Tls
        | ErrorKind::Routing
        | ErrorKind::Cluster
        | ErrorKind::Sentinel
        | ErrorKind::Auth => KvError::Unavailable(format!("{:?}: {details}", e.kind())),
        ErrorKind::Unknown => {
            // Server error replies start with an upper-case code (`ERR`, `OOM`, ...); fred's own
            // conditions ("Client is not initialized.", "Too many failed write attempts.") do not.
            let code = details.split_whitespace().next().unwrap_or("");
            let server_reply = !code.is_empty() && code.chars().all(|c| c.is_ascii_uppercase());
            // Server states that pass by themselves: the store is unavailable, not confused.
            let transient = [
                "OOM",
                "LOADING",
                "BUSY",
                "MASTERDOWN",
                "READONLY",
                "TRYAGAIN",
                "NOREPLICAS",
            ];
            if !server_reply || transient.contains(&code) {
                KvError::Unavailable(details)
            } else {
                KvError::Protocol(details)
            }
        }
        // WRONGTYPE (InvalidArgument), ERR replies, unparsable frames: Redis said something we
        // did not expect.
        _ => KvError::Protocol(format!("{:?}: {details}", e.kind())),
    }
}

fn unexpected(command: &str, value: &Value) -> KvError {
    KvError::Protocol(format!(
        "{command} returned an unexpected {:?} reply",
        value.kind()
    ))
}

fn int(command: &str, value: Value) -> Result<i64, KvError> {
    match value {
        Value::Integer(i) => Ok(i),
        other => Err(unexpected(command, &other)),
    }
}

fn bytes(value: Value) -> Option<Bytes> {
    match value {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        _ => None,
    }
}

/// Parse `field:number` out of an INFO reply.
fn info_field(info: &str, field: &str) -> Option<u64> {
    info.lines().find_map(|line| {
        line.trim()
            .strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .parse()
            .ok()
    })
}

#[async_trait]
impl KvStore for RedisStore {
    fn kind(&self) -> &'static str {
        STORE
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, KvError> {
        self.observe("get", async {
            check_name("key", key)?;
            match self
                .cmd(self.inner.client.get::<Value, _>(self.key(key)))
                .await?
            {
                Value::Null => Ok(None),
                other => match bytes(other.clone()) {
                    Some(b) => Ok(Some(b)),
                    None => Err(unexpected("GET", &other)),
                },
            }
        })
        .await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<(), KvError> {
        self.observe("set", async {
            if self.set_inner(key, value, ttl, false).await? {
                Ok(())
            } else {
                Err(KvError::Protocol(
                    "SET without NX was not applied".to_owned(),
                ))
            }
        })
        .await
    }

    async fn set_nx(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<bool, KvError> {
        self.observe("set", self.set_inner(key, value, ttl, true))
            .await
    }

    async fn delete(&self, key: &str) -> Result<bool, KvError> {
        self.observe("delete", async {
            check_name("key", key)?;
            Ok(int(
                "DEL",
                self.cmd(self.inner.client.del::<Value, _>(self.key(key)))
                    .await?,
            )? > 0)
        })
        .await
    }

    async fn ttl(&self, key: &str) -> Result<Option<Duration>, KvError> {
        self.observe("get", async {
            check_name("key", key)?;
            // -2: missing, -1: no expiry.
            let ms = int(
                "PTTL",
                self.cmd(self.inner.client.pttl::<Value, _>(self.key(key)))
                    .await?,
            )?;
            Ok(u64::try_from(ms).ok().map(Duration::from_millis))
        })
        .await
    }

    async fn try_lock(&self, key: &str, lease: Duration) -> Result<Option<LockGuard>, KvError> {
        self.observe("lock", async {
            check_name("lock key", key)?;
            let lease = ttl_millis(lease)?;
            let owner = uuid::Uuid::new_v4().simple().to_string();
            let (lock, fence) = self.lock_keys(key);
            let token = int(
                "lock script",
                self.eval(
                    LOCK_ACQUIRE,
                    vec![lock, fence],
                    vec![owner.clone(), lease.to_string()],
                )
                .await?,
            )?;
            match token {
                0 => Ok(None),
                t if t > 0 => Ok(Some(LockGuard {
                    key: key.to_owned(),
                    owner,
                    fencing_token: t as u64,
                })),
                t => Err(KvError::Protocol(format!("negative fencing token {t}"))),
            }
        })
        .await
    }

    async fn extend_lock(&self, guard: &LockGuard, lease: Duration) -> Result<bool, KvError> {
        self.observe("lock", async {
            let lease = ttl_millis(lease)?;
            let (lock, _) = self.lock_keys(&guard.key);
            let reply = self
                .eval(
                    LOCK_EXTEND,
                    vec![lock],
                    vec![guard.owner.clone(), lease.to_string()],
                )
                .await?;
            Ok(int("extend script", reply)? == 1)
        })
        .await
    }

    async fn release_lock(&self, guard: &LockGuard) -> Result<bool, KvError> {
        self.observe("lock", async {
            let (lock, _) = self.lock_keys(&guard.key);
            let reply = self
                .eval(LOCK_RELEASE, vec![lock], vec![guard.owner.clone()])
                .await?;
            Ok(int("release script", reply)? == 1)
        })
        .await
    }

    async fn current_fencing_token(&self, key: &str) -> Result<u64, KvError> {
        self.observe("lock", async {
            check_name("lock key", key)?;
            let (_, fence) = self.lock_keys(key);
            let reply = self.cmd(self.inner.client.get::<Value, _>(fence)).await?;
            match reply {
                Value::Null => Ok(0),
                Value::Integer(i) => {
                    u64::try_from(i).map_err(|_| unexpected("GET fence", &Value::Integer(i)))
                }
                other => bytes(other.clone())
                    .and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
                    .ok_or_else(|| unexpected("GET fence", &other)),
            }
        })
        .await
    }

    async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), KvError> {
        self.observe("publish", async {
            check_name("channel", channel)?;
            self.cmd(
                self.inner
                    .client
                    .publish::<Value, _, _>(self.key(channel), Value::Bytes(payload)),
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn subscribe(&self, channel: &str) -> Result<BoxStream<'static, Bytes>, KvError> {
        self.observe("subscribe", async {
            check_name("channel", channel)?;
            let full = self.key(channel);
            let inner = &self.inner;
            // Taken before SUBSCRIBE so nothing published right after it returns is missed.
            let rx = inner.subscriber.message_rx();
            {
                let mut wanted = inner.wanted.lock().await;
                let count = wanted.entry(full.clone()).or_insert(0);
                *count += 1;
                if *count == 1 {
                    // Not fail-fast: a subscriber connection still being established (right
                    // after start, or through Sentinel) is waited for, up to the timeout, so the
                    // channel is live when this returns and nothing published next is lost.
                    let fast = inner.subscriber.with_options(&Options {
                        timeout: Some(inner.timeout),
                        ..Options::default()
                    });
                    let channels = vec![full.clone(), inner.probe.clone()];
                    match timed(inner.timeout, fast.subscribe(channels)).await {
                        Ok(()) => {
                            // The SUBSCRIBE was answered, but a connection replaced right after
                            // (first connect, Sentinel, failover) may not carry it yet: prove it
                            // with a round trip through the server before returning.
                            if !self.confirm_subscribed(&wanted).await {
                                tracing::warn!(
                                    channel = %full,
                                    "redis subscription not confirmed; it is retried in the background"
                                );
                                inner.retry.notify_one();
                            }
                        }
                        // Redis is down or slow: the channel stays wanted and `keep_subscribed`
                        // subscribes it as soon as it can.
                        Err(KvError::Unavailable(reason)) => {
                            tracing::warn!(%reason, "redis subscribe deferred");
                            inner.retry.notify_one();
                        }
                        Err(other) => {
                            wanted.remove(&full);
                            return Err(other);
                        }
                    }
                }
            }
            let guard = Subscription {
                store: inner.clone(),
                channel: full.clone(),
            };
            let stream = stream::unfold((rx, guard), move |(mut rx, guard)| async move {
                loop {
                    match rx.recv().await {
                        Ok(message) if *message.channel == *guard.channel => {
                            if let Some(payload) = bytes(message.value) {
                                return Some((payload, (rx, guard)));
                            }
                        }
                        Ok(_) => {}
                        // At most once: a slow subscriber skips what it missed.
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(
                                skipped = n,
                                "redis kv subscriber lagged; messages dropped"
                            );
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
            Ok(stream.boxed())
        })
        .await
    }

    async fn presence_heartbeat(
        &self,
        set: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<(), KvError> {
        self.observe("presence", async {
            check_name("presence set", set)?;
            check_name("presence member", member)?;
            let ttl = ttl_millis(ttl)?;
            let reply = self
                .eval(
                    PRESENCE_HEARTBEAT,
                    vec![self.key(set)],
                    vec![member.to_owned(), ttl.to_string()],
                )
                .await?;
            int("presence script", reply).map(|_| ())
        })
        .await
    }

    async fn presence_remove(&self, set: &str, member: &str) -> Result<(), KvError> {
        self.observe("presence", async {
            check_name("presence set", set)?;
            int(
                "ZREM",
                self.cmd(
                    self.inner
                        .client
                        .zrem::<Value, _, _>(self.key(set), member.to_owned()),
                )
                .await?,
            )
            .map(|_| ())
        })
        .await
    }

    async fn presence_members(&self, set: &str) -> Result<Vec<String>, KvError> {
        self.observe("presence", async {
            check_name("presence set", set)?;
            let reply = self
                .eval(PRESENCE_MEMBERS, vec![self.key(set)], Vec::new())
                .await?;
            let items = match reply {
                Value::Array(items) => items,
                Value::Null => Vec::new(),
                other => return Err(unexpected("presence script", &other)),
            };
            let mut members = items
                .into_iter()
                .map(|v| {
                    bytes(v.clone())
                        .and_then(|b| String::from_utf8(b.to_vec()).ok())
                        .ok_or_else(|| unexpected("presence script", &v))
                })
                .collect::<Result<Vec<_>, _>>()?;
            members.sort();
            Ok(members)
        })
        .await
    }

    async fn health(&self) -> Result<(), KvError> {
        self.observe("health", async {
            self.cmd(self.inner.client.ping::<Value>(None)).await?;
            if !self.inner.subscriber.is_connected() {
                return Err(KvError::Unavailable(
                    "redis subscriber connection is down".to_owned(),
                ));
            }
            Ok(())
        })
        .await
    }

    async fn memory(&self) -> Result<(u64, Option<u64>), KvError> {
        self.observe("memory", async {
            let info = self
                .cmd(self.inner.client.info::<Value>(Some(InfoKind::Memory)))
                .await?;
            let text = bytes(info.clone())
                .and_then(|b| String::from_utf8(b.to_vec()).ok())
                .ok_or_else(|| unexpected("INFO", &info))?;
            let used = info_field(&text, "used_memory")
                .ok_or_else(|| KvError::Protocol("INFO memory has no used_memory".to_owned()))?;
            // maxmemory 0 means no limit.
            let max = info_field(&text, "maxmemory").filter(|m| *m > 0);
            Ok((used, max))
        })
        .await
    }

    async fn removals(&self) -> Result<Option<(u64, u64)>, KvError> {
        self.observe("removals", async {
            let info = self
                .cmd(self.inner.client.info::<Value>(Some(InfoKind::Stats)))
                .await?;
            let text = bytes(info.clone())
                .and_then(|b| String::from_utf8(b.to_vec()).ok())
                .ok_or_else(|| unexpected("INFO", &info))?;
            Ok(info_field(&text, "evicted_keys").zip(info_field(&text, "expired_keys")))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::info_field;

    #[test]
    fn info_fields_parse_exact_names() {
        let info = "# Memory\r\nused_memory:1024\r\nused_memory_human:1.00K\r\nmaxmemory:0\r\n";
        assert_eq!(info_field(info, "used_memory"), Some(1024));
        assert_eq!(info_field(info, "maxmemory"), Some(0));
        assert_eq!(info_field(info, "maxmemory_policy"), None);
    }
}
