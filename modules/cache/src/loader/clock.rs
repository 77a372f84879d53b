//! Wall-clock milliseconds: precise for writes, coarse (and cheap) for the hit path's
//! fresh/stale check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Wall-clock milliseconds for expiry checks, from the kernel's coarse monotonic clock (a
/// memory read in the vDSO, a few ms of resolution — ample against TTLs of seconds) plus an
/// offset to the wall clock re-read at most once a second, so drift and clock steps show
/// within a second. A precise `clock_gettime` costs ~25 ns on this kind of VM, a tenth of an
/// L1 hit.
pub(super) struct WallClock {
    base: coarsetime::Instant,
    /// Wall-clock ms at `base`.
    wall_at_base: AtomicU64,
    /// Ms after `base` of the last re-read.
    synced_at: AtomicU64,
}

impl WallClock {
    pub(super) fn new() -> Self {
        let c = Self {
            base: coarsetime::Instant::now_without_cache_update(),
            wall_at_base: AtomicU64::new(0),
            synced_at: AtomicU64::new(0),
        };
        c.sync();
        c
    }

    /// Ms of the coarse clock since `base`.
    fn mono_ms(&self) -> u64 {
        coarsetime::Instant::now_without_cache_update()
            .duration_since(self.base)
            .as_millis()
    }

    fn sync(&self) {
        // The two reads side by side, so the offset does not take in a pause between them.
        let mono = self.mono_ms();
        let wall = now_ms();
        self.wall_at_base
            .store(wall.saturating_sub(mono), Ordering::Relaxed);
        self.synced_at.store(mono, Ordering::Relaxed);
    }

    pub(super) fn wall_ms(&self) -> u64 {
        let mono = self.mono_ms();
        if mono.saturating_sub(self.synced_at.load(Ordering::Relaxed)) >= 1000 {
            self.sync();
            return self.wall_at_base.load(Ordering::Relaxed) + self.mono_ms();
        }
        self.wall_at_base.load(Ordering::Relaxed) + mono
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_wall_clock_tracks_the_system_clock() {
        let c = WallClock::new();
        for _ in 0..4 {
            let before = now_ms();
            let ours = c.wall_ms();
            let after = now_ms();
            // The coarse clock lags by at most a tick (a few ms; 10 ms at HZ=100).
            assert!(
                ours + 25 >= before && ours <= after + 25,
                "derived {ours} outside system [{before}, {after}]"
            );
            std::thread::sleep(Duration::from_millis(600));
        }
    }
}
