//! The `[cache]` section: one declared policy per namespace (C4).

use std::collections::BTreeMap;
use std::time::Duration;

use bulwark_kernel::config::ConfigError;
use serde::{Deserialize, Serialize};

/// Why a namespace may be cached at all (C4). `never` exists so that money, stock counts and
/// live prices can be *declared* uncacheable: such a namespace is refused at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheClass {
    /// Read far more often than written (reference data, catalogues).
    ReadMostly,
    /// Expensive to compute, slow to change (aggregates, reports).
    Expensive,
    /// Whole API responses or rendered fragments.
    Response,
    /// Must not be cached: high-write or strict-consistency data.
    Never,
}

/// What a process does on a miss (C2, C3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Past the soft TTL serve the stale value at once while one refresh runs.
    Swr,
    /// On a miss one process in the cluster loads under a lock; the others wait.
    Lock,
}

/// What a waiter does when the lock holder has not filled the key within `lock_wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Serve a stale value if there is one, else load.
    Stale,
    /// Answer 503.
    Unavailable,
    /// Load anyway.
    Load,
}

/// One namespace's declared policy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespacePolicy {
    /// Why this data is cacheable.
    pub class: CacheClass,
    /// The declaration in words: expected reads per write, cost, volatility.
    pub reason: String,
    /// Fresh for this long.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Random spread added to every TTL, as a fraction of it (C1): 0.1 = up to +10%.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    #[serde(default = "default_strategy")]
    pub strategy: Strategy,
    /// After the TTL a value may still be served stale for this long (SWR; lock's fallback).
    #[serde(default = "default_stale_ttl", with = "humantime_serde")]
    pub stale_ttl: Duration,
    /// How long waiters wait for the lock holder.
    #[serde(default = "default_lock_wait", with = "humantime_serde")]
    pub lock_wait: Duration,
    /// Lease of the fill lock: a crashed holder blocks no longer than this.
    #[serde(default = "default_lock_lease", with = "humantime_serde")]
    pub lock_lease: Duration,
    #[serde(default = "default_fallback")]
    pub fallback: Fallback,
    /// XFetch β (probabilistic early refresh); unset disables it. 1.0 is the paper's default.
    #[serde(default)]
    pub early_refresh_beta: Option<f64>,
    /// Larger values are served but not cached.
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: usize,
    /// A failed load is remembered this long: requests in that time get the error (or a stale
    /// value) without running the loader again, so a failing origin is not hammered.
    /// A failure never replaces a good value. `0s` disables it.
    #[serde(default = "default_error_ttl", with = "humantime_serde")]
    pub error_ttl: Duration,
    /// Admission (like nginx `proxy_cache_min_uses`): a key is stored only once it was requested
    /// this many times within `min_uses_window` in this process; before that it is loaded and
    /// served but not cached, so keys read once (the long tail) do not push hot keys out.
    #[serde(default = "default_min_uses")]
    pub min_uses: u32,
    #[serde(default = "default_min_uses_window", with = "humantime_serde")]
    pub min_uses_window: Duration,
    /// Keep a copy in the process (L1). `false` makes the namespace L2-only: every read goes
    /// to Redis, so an invalidation takes effect everywhere at once (no broadcast window), at
    /// the cost of a round trip per read.
    #[serde(default = "default_true")]
    pub l1: bool,
    /// A reserved fraction of `cache.l1_max_bytes` for this namespace's own L1, so that other
    /// namespaces cannot evict it. Unset: it shares what the reserved fractions leave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l1_share: Option<f64>,
}

fn default_jitter() -> f64 {
    0.1
}
fn default_strategy() -> Strategy {
    Strategy::Swr
}
fn default_stale_ttl() -> Duration {
    Duration::from_secs(60)
}
fn default_lock_wait() -> Duration {
    Duration::from_secs(2)
}
fn default_lock_lease() -> Duration {
    Duration::from_secs(10)
}
fn default_fallback() -> Fallback {
    Fallback::Stale
}
fn default_max_value_bytes() -> usize {
    512 * 1024
}
fn default_error_ttl() -> Duration {
    Duration::from_secs(1)
}
fn default_true() -> bool {
    true
}
fn default_min_uses() -> u32 {
    1
}
fn default_min_uses_window() -> Duration {
    Duration::from_secs(600)
}

/// The `[cache]` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes the in-process tier (L1) may hold across all namespaces.
    #[serde(default = "default_l1_max_bytes")]
    pub l1_max_bytes: u64,
    /// Declared namespaces, by name.
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespacePolicy>,
    /// Named cached queries, served at `/api/cache/queries/{name}`.
    #[serde(default)]
    pub queries: BTreeMap<String, crate::queries::QueryConfig>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            l1_max_bytes: default_l1_max_bytes(),
            namespaces: BTreeMap::new(),
            queries: BTreeMap::new(),
        }
    }
}

fn default_l1_max_bytes() -> u64 {
    64 * 1024 * 1024
}

impl bulwark_kernel::config::ModuleConfig for CacheConfig {
    /// Rules serde cannot express; errors name the key.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.l1_max_bytes == 0 {
            return Err(ConfigError::new(
                "cache.l1_max_bytes",
                "must be greater than 0",
            ));
        }
        for (name, p) in &self.namespaces {
            let key = |k: &str| format!("cache.namespaces.{name}.{k}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(ConfigError::new(
                    format!("cache.namespaces.{name}"),
                    "names use letters, digits, `_` and `-`",
                ));
            }
            if p.class == CacheClass::Never {
                return Err(ConfigError::new(
                    key("class"),
                    "class `never` is declared uncacheable (money, stock counts, live prices); remove the namespace or change what it caches",
                ));
            }
            if p.reason.trim().is_empty() {
                return Err(ConfigError::new(
                    key("reason"),
                    "say why this is cacheable (reads per write, cost, volatility)",
                ));
            }
            if p.ttl.is_zero() {
                return Err(ConfigError::new(key("ttl"), "must be greater than 0"));
            }
            if !(0.0..1.0).contains(&p.jitter) {
                return Err(ConfigError::new(
                    key("jitter"),
                    "a fraction of the TTL in [0, 1)",
                ));
            }
            if p.lock_lease.is_zero() {
                return Err(ConfigError::new(
                    key("lock_lease"),
                    "must be greater than 0",
                ));
            }
            if p.min_uses == 0 {
                return Err(ConfigError::new(
                    key("min_uses"),
                    "must be at least 1 (1 caches on the first use)",
                ));
            }
            if p.min_uses > 1 && p.min_uses_window.is_zero() {
                return Err(ConfigError::new(
                    key("min_uses_window"),
                    "must be greater than 0 when min_uses is above 1",
                ));
            }
            if let Some(beta) = p.early_refresh_beta
                && !(beta > 0.0 && beta.is_finite())
            {
                return Err(ConfigError::new(
                    key("early_refresh_beta"),
                    "must be a positive number",
                ));
            }
        }
        let mut reserved = 0.0;
        for (name, p) in &self.namespaces {
            if let Some(share) = p.l1_share {
                if !(share > 0.0 && share <= 1.0) {
                    return Err(ConfigError::new(
                        format!("cache.namespaces.{name}.l1_share"),
                        "a fraction of cache.l1_max_bytes in (0, 1]",
                    ));
                }
                reserved += share;
            }
        }
        if reserved > 1.0 + 1e-9 {
            return Err(ConfigError::new(
                "cache.namespaces",
                format!("the l1_share values add up to {reserved:.2}; at most 1"),
            ));
        }
        if let Some((name, _)) = self
            .namespaces
            .iter()
            .find(|(_, p)| p.l1_share.is_none() && p.l1)
            && reserved >= 1.0 - 1e-9
        {
            return Err(ConfigError::new(
                format!("cache.namespaces.{name}.l1_share"),
                "the other namespaces reserve all of cache.l1_max_bytes; give this one a share too",
            ));
        }
        for (name, q) in &self.queries {
            q.validate(name, &self.namespaces)?;
        }
        Ok(())
    }
}
