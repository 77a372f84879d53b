//! The `[pipeline]` section.

use std::path::PathBuf;
use std::time::Duration;

use bulwark_kernel::config::ConfigError;
use serde::{Deserialize, Serialize};

/// Settings of the pipeline module. Every field has a default, so an empty section works.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// The folder of DAG files (`*.toml`); relative paths are under `kernel.data_dir`.
    pub dags_folder: PathBuf,
    /// How often the active scheduler looks for changed, added or removed DAG files.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Task instances one worker process runs at once.
    pub worker_slots: usize,
    /// The most tries queued or running at once over all pools (Airflow's `parallelism`): set
    /// it to the worker slots of the whole deployment, so a queued try is one a worker can start
    /// at once. 0 means this config's `worker_slots` (right for one `serve` process).
    pub parallelism: usize,
    /// The longest a scheduler sleeps between passes; work (a finished task, a trigger)
    /// wakes it sooner.
    #[serde(with = "humantime_serde")]
    pub scheduler_interval: Duration,
    /// The scheduler lease: a standby takes over within this long of the active one's death.
    #[serde(with = "humantime_serde")]
    pub scheduler_lease: Duration,
    /// How often a running task's worker records that it is alive.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A running task whose worker has not heartbeated for this long is a zombie: its try
    /// fails (and is retried when it has tries left).
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// Slots of the `default` pool when the scheduler first creates it.
    pub default_pool_slots: u32,
    /// The most runs one backfill may create without `allow_large` (P15: no unbounded backfills).
    pub max_backfill_runs: usize,
    /// The most task instances the scheduler queues in one pass.
    pub max_queue_per_pass: usize,
    /// Log bytes a running task buffers before writing a chunk (also written every heartbeat).
    pub log_chunk_bytes: usize,
    /// The most log bytes kept per try; the rest is cut with a note.
    pub max_log_bytes_per_try: usize,
    /// The data engine of `sql` tasks (issue 13).
    pub engine: EngineConfig,
}

/// Where `sql` tasks' queries run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// DataFusion in this process (the embedded default).
    #[default]
    Datafusion,
    /// An Apache Ballista cluster at `scheduler_url` (P11): the query runs on its executors,
    /// which must see the warehouse at the same path; checks and outputs run here.
    Ballista,
}

/// `[pipeline.engine]`: DataFusion in process over the warehouse folder, or a Ballista cluster.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// `datafusion` (in process) or `ballista`.
    pub kind: EngineKind,
    /// The Ballista scheduler, `df://host:port` (needed when `kind = "ballista"`).
    pub scheduler_url: Option<String>,
    /// The warehouse: one folder per table (Delta or Parquet); under `kernel.data_dir` when
    /// relative.
    pub warehouse: PathBuf,
    /// The memory one query may use, in MiB; sorts, aggregates and joins spill to `spill_dir`
    /// beyond it (P11). 0: unbounded (and hash joins, which cannot spill).
    pub memory_limit_mb: u64,
    /// Where spill files and staged query results go; under `kernel.data_dir` when relative.
    pub spill_dir: PathBuf,
    /// Partitions a query runs in parallel; 0: one per core.
    pub target_partitions: usize,
    /// Rows per Arrow batch.
    pub batch_size: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kind: EngineKind::Datafusion,
            scheduler_url: None,
            warehouse: PathBuf::from("warehouse"),
            memory_limit_mb: 0,
            spill_dir: PathBuf::from("spill"),
            target_partitions: 0,
            batch_size: 8192,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            dags_folder: PathBuf::from("dags"),
            reload_interval: Duration::from_secs(5),
            worker_slots: 16,
            parallelism: 0,
            scheduler_interval: Duration::from_secs(1),
            scheduler_lease: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(30),
            default_pool_slots: 128,
            max_backfill_runs: 1000,
            max_queue_per_pass: 2048,
            log_chunk_bytes: 16 * 1024,
            max_log_bytes_per_try: 4 * 1024 * 1024,
            engine: EngineConfig::default(),
        }
    }
}

impl PipelineConfig {
    /// [`PipelineConfig::parallelism`], with 0 resolved.
    pub fn effective_parallelism(&self) -> usize {
        if self.parallelism == 0 {
            self.worker_slots
        } else {
            self.parallelism
        }
    }
}

impl bulwark_kernel::config::ModuleConfig for PipelineConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |key: &str, message: &str| Err(ConfigError::new(format!("pipeline.{key}"), message));
        if self.reload_interval < Duration::from_millis(100) {
            return bad("reload_interval", "must be at least 100ms");
        }
        if self.worker_slots == 0 || self.worker_slots > 4096 {
            return bad("worker_slots", "must be 1 to 4096");
        }
        if self.scheduler_interval < Duration::from_millis(10) {
            return bad("scheduler_interval", "must be at least 10ms");
        }
        if self.scheduler_lease < Duration::from_secs(1) {
            return bad("scheduler_lease", "must be at least 1s");
        }
        if self.heartbeat_interval < Duration::from_millis(100) {
            return bad("heartbeat_interval", "must be at least 100ms");
        }
        if self.heartbeat_timeout <= self.heartbeat_interval * 2 {
            return bad(
                "heartbeat_timeout",
                "must be more than twice heartbeat_interval (one missed beat is not a death)",
            );
        }
        if self.default_pool_slots == 0 {
            return bad("default_pool_slots", "must be at least 1");
        }
        if self.max_backfill_runs == 0 {
            return bad("max_backfill_runs", "must be at least 1");
        }
        if self.max_queue_per_pass == 0 {
            return bad("max_queue_per_pass", "must be at least 1");
        }
        if self.log_chunk_bytes < 256 {
            return bad("log_chunk_bytes", "must be at least 256");
        }
        if self.max_log_bytes_per_try < self.log_chunk_bytes {
            return bad("max_log_bytes_per_try", "must be at least log_chunk_bytes");
        }
        let e = &self.engine;
        if e.kind == EngineKind::Ballista {
            let Some(u) = &e.scheduler_url else {
                return bad(
                    "engine.scheduler_url",
                    "is needed when engine.kind = \"ballista\" (the scheduler, df://host:port)",
                );
            };
            match url::Url::parse(u) {
                Ok(p) if p.host_str().is_some() => {}
                _ => {
                    return bad(
                        "engine.scheduler_url",
                        "must be a URL with a host, like df://127.0.0.1:50050",
                    );
                }
            }
        }
        if e.memory_limit_mb != 0 && e.memory_limit_mb < 16 {
            return bad(
                "engine.memory_limit_mb",
                "must be 0 (unbounded) or at least 16",
            );
        }
        if e.batch_size == 0 || e.batch_size > 1 << 20 {
            return bad("engine.batch_size", "must be 1 to 1048576");
        }
        if e.target_partitions > 1024 {
            return bad(
                "engine.target_partitions",
                "must be 0 (one per core) to 1024",
            );
        }
        Ok(())
    }
}
