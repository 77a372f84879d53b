//! Graceful shutdown (K7).
//!
//! SIGTERM/SIGINT → [`Shutdown::is_draining`] (readiness 503 at once) → keep serving for
//! `drain.grace` so load balancers stop routing → [`Shutdown::closing_token`] fires: the
//! listener stops accepting, tracked WebSockets close with 1012 (service restart: reconnect
//! elsewhere), workers stop fetching → in-flight requests, sockets and bus handlers get up to
//! `drain.timeout` → [`Shutdown::deadline_token`] fires: handlers nak what they could not
//! finish → telemetry is flushed and the process exits 0.
//!
//! axum's graceful shutdown does not see upgraded WebSockets, so sockets and workers run on
//! the [`TaskTracker`] here, which is what the drain waits for.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// WebSocket close code sent while draining: "Service Restart" (RFC 6455 registry).
pub const CLOSE_SERVICE_RESTART: u16 = 1012;

#[derive(Clone, Default)]
pub struct Shutdown {
    draining: CancellationToken,
    closing: CancellationToken,
    deadline: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// True from the first signal on.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }
    /// Fires at the first signal.
    pub fn draining_token(&self) -> CancellationToken {
        self.draining.clone()
    }
    /// Fires after `drain.grace`: stop taking work, close sockets with 1012.
    pub fn closing_token(&self) -> CancellationToken {
        self.closing.clone()
    }
    /// Fires after `drain.timeout`: abandon (nak) unfinished work.
    pub fn deadline_token(&self) -> CancellationToken {
        self.deadline.clone()
    }

    /// Run a task the drain waits for (a WebSocket, a worker loop).
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Tracked tasks still running.
    pub fn tracked(&self) -> usize {
        self.tracker.len()
    }

    /// Begin draining now (what a signal does; tests call it directly).
    pub fn trigger(&self) {
        if !self.draining.is_cancelled() {
            tracing::info!(message = "Draining: readiness now fails.");
            self.draining.cancel();
        }
    }

    /// Wait for SIGTERM or SIGINT, then [`Shutdown::trigger`].
    pub async fn wait_for_signal(&self) {
        let ctrl_c = async {
            if let Err(error) = tokio::signal::ctrl_c().await {
                tracing::error!(message = "Cannot listen for SIGINT.", %error);
                std::future::pending::<()>().await;
            }
        };
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(error) => {
                    tracing::error!(message = "Cannot listen for SIGTERM.", %error);
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
            _ = self.draining.cancelled() => {}
        }
        self.trigger();
    }

    /// The drain sequence after the signal: grace, close, then wait up to `timeout` for tracked
    /// work and for `also` (the HTTP server finishing its in-flight requests).
    /// Returns whether everything finished in time.
    pub async fn drain<F: Future>(&self, grace: Duration, timeout: Duration, also: F) -> bool {
        self.draining.cancelled().await;
        tokio::select! {
            _ = tokio::time::sleep(grace) => {}
            _ = self.closing.cancelled() => {}
        }
        tracing::info!(
            message = "Closing: no new connections; sockets told to reconnect.",
            tracked = self.tracker.len()
        );
        self.closing.cancel();
        self.tracker.close();
        let finished =
            tokio::time::timeout(timeout, futures::future::join(self.tracker.wait(), also))
                .await
                .is_ok();
        if !finished {
            tracing::warn!(
                message = "Drain timeout: abandoning unfinished work.",
                remaining = self.tracker.len()
            );
        }
        self.deadline.cancel();
        // Give abandoned handlers a moment to nak.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
        finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tracked_work() {
        let s = Shutdown::new();
        let closing = s.closing_token();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        s.spawn(async move {
            closing.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            d.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        s.trigger();
        assert!(s.is_draining());
        assert!(
            s.drain(Duration::from_millis(10), Duration::from_secs(5), async {})
                .await
        );
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn drain_gives_up_at_timeout() {
        let s = Shutdown::new();
        let deadline = s.deadline_token();
        s.spawn(async move { deadline.cancelled().await });
        s.trigger();
        assert!(
            !s.drain(Duration::from_millis(1), Duration::from_millis(50), async {
            })
            .await
        );
    }
}
