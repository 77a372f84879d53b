//! Readiness (`/readyz`): every configured dependency, and 503 while draining.
//!
//! A monitor re-runs the checks in the background so that losing Redis or NATS shows up as a
//! metric (`bulwark_dependency_up{dependency}`) and one log line per transition even when no
//! probe is asking, and recovery is logged the same way.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::shutdown::Shutdown;

/// One dependency's health.
#[async_trait]
pub trait ReadinessCheck: Send + Sync {
    /// Dependency name as shown in `/readyz` and metrics (`database`, `bus:nats`, `kv:redis`, ...).
    fn name(&self) -> &str;
    async fn check(&self) -> Result<(), String>;
}

/// A check from a closure.
pub struct FnCheck<F> {
    name: String,
    f: F,
}

impl<F, Fut> FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    pub fn new(name: impl Into<String>, f: F) -> Self {
        Self {
            name: name.into(),
            f,
        }
    }
}

#[async_trait]
impl<F, Fut> ReadinessCheck for FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    fn name(&self) -> &str {
        &self.name
    }
    async fn check(&self) -> Result<(), String> {
        (self.f)().await
    }
}

/// The `/readyz` body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReadinessReport {
    /// `ready`, `not_ready` or `draining`.
    pub status: &'static str,
    /// Per dependency: `ok` or the error.
    pub checks: BTreeMap<String, String>,
}

impl ReadinessReport {
    pub fn is_ready(&self) -> bool {
        self.status == "ready"
    }
}

/// All readiness checks of the process.
#[derive(Clone)]
pub struct Readiness {
    checks: Arc<Vec<Arc<dyn ReadinessCheck>>>,
    shutdown: Shutdown,
    last: Arc<Mutex<HashMap<String, bool>>>,
    timeout: Duration,
}

impl Readiness {
    pub fn new(checks: Vec<Arc<dyn ReadinessCheck>>, shutdown: Shutdown) -> Self {
        Self {
            checks: Arc::new(checks),
            shutdown,
            last: Arc::default(),
            timeout: Duration::from_secs(2),
        }
    }

    /// Run every check (concurrently, each bounded by a timeout).
    pub async fn report(&self) -> ReadinessReport {
        let results = futures::future::join_all(self.checks.iter().map(|c| async move {
            let r = match tokio::time::timeout(self.timeout, c.check()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            };
            (c.name().to_owned(), r)
        }))
        .await;
        let mut checks = BTreeMap::new();
        let mut all_ok = true;
        for (name, result) in results {
            let ok = result.is_ok();
            all_ok &= ok;
            self.record(&name, &result);
            checks.insert(name, result.err().unwrap_or_else(|| "ok".to_owned()));
        }
        let status = if self.shutdown.is_draining() {
            "draining"
        } else if all_ok {
            "ready"
        } else {
            "not_ready"
        };
        ReadinessReport { status, checks }
    }

    fn record(&self, name: &str, result: &Result<(), String>) {
        let ok = result.is_ok();
        metrics::gauge!("bulwark_dependency_up", "dependency" => name.to_owned()).set(if ok {
            1.0
        } else {
            0.0
        });
        let previous = self
            .last
            .lock()
            .ok()
            .and_then(|mut last| last.insert(name.to_owned(), ok));
        match (previous, result) {
            (Some(true) | None, Err(error)) => {
                metrics::counter!("bulwark_dependency_failures_total", "dependency" => name.to_owned()).increment(1);
                tracing::error!(message = "Dependency unavailable.", dependency = name, error = %error);
            }
            (Some(false), Ok(())) => {
                tracing::info!(message = "Dependency recovered.", dependency = name)
            }
            _ => {}
        }
    }

    /// Re-run the checks every `every` until shutdown, so metrics and logs track dependencies.
    pub fn spawn_monitor(&self, every: Duration) {
        let this = self.clone();
        let stop = self.shutdown.closing_token();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => { this.report().await; }
                }
            }
        });
    }
}
