//! The stored entry — its byte format in L2 — and the expiry arithmetic: TTL jitter (C1) and
//! XFetch's early-refresh decision.

use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// Bumped when the entry encoding changes: older entries then read as misses.
pub const FORMAT_VERSION: u8 = 1;

/// A cached value with its expiry times (ms since the epoch) and the duration of the load
/// that produced it (XFetch's δ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    pub soft_expires_ms: u64,
    pub hard_expires_ms: u64,
    pub delta_ms: u64,
}

impl Entry {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(25 + self.value.len());
        b.put_u8(FORMAT_VERSION);
        b.put_u64(self.soft_expires_ms);
        b.put_u64(self.hard_expires_ms);
        b.put_u64(self.delta_ms);
        b.put_slice(&self.value);
        b.freeze()
    }

    /// `None` for another format version or a truncated value: a miss, never a crash.
    pub fn decode(mut raw: Bytes) -> Option<Self> {
        if raw.len() < 25 || raw[0] != FORMAT_VERSION {
            return None;
        }
        raw.advance(1);
        let soft_expires_ms = raw.get_u64();
        let hard_expires_ms = raw.get_u64();
        let delta_ms = raw.get_u64();
        Some(Self {
            value: raw,
            soft_expires_ms,
            hard_expires_ms,
            delta_ms,
        })
    }
}

/// TTL with jitter (C1): `ttl · (1 + jitter · U)`, U uniform in [0, 1).
pub fn jittered(ttl: Duration, jitter: f64, u: f64) -> Duration {
    ttl.mul_f64(1.0 + jitter * u.clamp(0.0, 1.0))
}

/// XFetch's decision: refresh early when `now − δ·β·ln(u) ≥ expiry` (u uniform in (0, 1]).
pub fn xfetch_should_refresh(
    now_ms: u64,
    expiry_ms: u64,
    delta_ms: u64,
    beta: f64,
    u: f64,
) -> bool {
    let u = u.clamp(f64::MIN_POSITIVE, 1.0);
    now_ms as f64 - delta_ms as f64 * beta * u.ln() >= expiry_ms as f64
}
