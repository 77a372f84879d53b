//! The `[annotation]` section.

use std::path::PathBuf;
use std::time::Duration;

use bulwark_kernel::config::ConfigError;
use serde::{Deserialize, Serialize};

/// Settings of the annotation module. Every field has a default, so an empty section works.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnotationConfig {
    /// Annotations wanted per item, for projects created without their own `overlap`.
    pub overlap: u32,
    /// How long a lock holds an item, for projects created without their own TTL. A lock
    /// lapses by itself at its `expires_at`; nothing has to sweep it for the item to return.
    #[serde(with = "humantime_serde")]
    pub lock_ttl: Duration,
    /// Where export jobs write their files; relative paths are under `kernel.data_dir`.
    /// Processes that serve downloads must see the same directory (a shared volume).
    pub export_dir: PathBuf,
    /// Longest accepted import line (JSON lines) or record (CSV), in bytes.
    pub max_import_line_bytes: usize,
    /// How often the janitor removes lapsed locks (counting them as expiries) and refreshes
    /// the queue-depth gauges.
    #[serde(with = "humantime_serde")]
    pub janitor_interval: Duration,
    /// How often an idle export worker looks for pending export jobs.
    #[serde(with = "humantime_serde")]
    pub export_poll_interval: Duration,
    /// An export job `running` for longer than this is taken to be a crashed worker's and is
    /// claimed again (its file is rewritten from the start; the bytes are the same).
    #[serde(with = "humantime_serde")]
    pub export_stale_after: Duration,
    /// The `dvc` executable `bulwark annotation export --dvc` runs: a name looked up on PATH,
    /// or a path.
    pub dvc_bin: String,
}

impl Default for AnnotationConfig {
    fn default() -> Self {
        Self {
            overlap: 1,
            lock_ttl: Duration::from_secs(30 * 60),
            export_dir: PathBuf::from("annotation/exports"),
            max_import_line_bytes: 1024 * 1024,
            janitor_interval: Duration::from_secs(10),
            export_poll_interval: Duration::from_secs(1),
            export_stale_after: Duration::from_secs(30 * 60),
            dvc_bin: "dvc".into(),
        }
    }
}

/// The most annotations one item can ask for.
pub const MAX_OVERLAP: u32 = 100;
/// The longest lock a project can ask for (a day).
pub const MAX_LOCK_TTL: Duration = Duration::from_secs(24 * 3600);

impl bulwark_kernel::config::ModuleConfig for AnnotationConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |key: &str, message: &str| Err(ConfigError::new(format!("annotation.{key}"), message));
        if self.overlap == 0 || self.overlap > MAX_OVERLAP {
            return bad("overlap", "must be 1 to 100");
        }
        if self.lock_ttl < Duration::from_secs(1) || self.lock_ttl > MAX_LOCK_TTL {
            return bad("lock_ttl", "must be 1s to 24h");
        }
        if self.max_import_line_bytes < 64 {
            return bad("max_import_line_bytes", "must be at least 64");
        }
        if self.janitor_interval < Duration::from_millis(100) {
            return bad("janitor_interval", "must be at least 100ms");
        }
        if self.export_poll_interval < Duration::from_millis(10) {
            return bad("export_poll_interval", "must be at least 10ms");
        }
        if self.export_stale_after < Duration::from_secs(1) {
            return bad("export_stale_after", "must be at least 1s");
        }
        if self.dvc_bin.trim().is_empty() {
            return bad("dvc_bin", "must not be empty");
        }
        Ok(())
    }
}
