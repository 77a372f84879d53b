//! The data engine (issue 13; P8, P10–P14): `sql` tasks run on DataFusion in process over the
//! tables of the warehouse (Delta, Parquet) and declared sources (Parquet, Delta, CSV), write
//! Delta tables (partition overwrite, MERGE, append, each commit with an application
//! transaction) or Parquet (an atomic swap), and gate their output with quality checks.
//!
//! * [`Engine`] — the configured DataFusion session (memory pool with spilling, P11) and the
//!   warehouse's tables.
//! * [`sql`] — the `sql` task type: arguments, validation, determinism (P13), the run.
//! * [`checks`] — expectations compiled to one aggregate scan, and quarantine (P10).
//! * [`output`] — Delta and Parquet outputs (P8, P14).
//! * [`cluster`] — Ballista's scheduler and executor run from this binary (P11).

pub mod checks;
pub mod cluster;
pub mod output;
pub mod sql;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionConfig, SessionContext};
use serde::{Deserialize, Serialize};

use crate::config::{EngineConfig, EngineKind};
use crate::exec::TaskTypes;

/// Why the engine could not do what a task asked. The message is the task's error.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The task's arguments or its SQL are wrong (the user's to fix).
    #[error("{0}")]
    Invalid(String),
    /// The query needed more memory than the pool allows, even spilling.
    #[error(
        "the query needs more memory than pipeline.engine.memory_limit_mb allows, even spilling \
         to disk: {0}"
    )]
    Resources(String),
    #[error("query: {0}")]
    Query(String),
    #[error("delta: {0}")]
    Delta(String),
    #[error("{0}")]
    Io(String),
}

impl From<datafusion::error::DataFusionError> for EngineError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        use datafusion::error::DataFusionError as D;
        match e.find_root() {
            D::ResourcesExhausted(m) => EngineError::Resources(m.clone()),
            D::Plan(m) | D::SQL(_, Some(m)) => EngineError::Invalid(m.clone()),
            D::SchemaError(..) | D::SQL(..) => EngineError::Invalid(e.find_root().to_string()),
            _ => EngineError::Query(e.to_string()),
        }
    }
}

impl From<deltalake::DeltaTableError> for EngineError {
    fn from(e: deltalake::DeltaTableError) -> Self {
        EngineError::Delta(e.to_string())
    }
}

impl From<std::io::Error> for EngineError {
    fn from(e: std::io::Error) -> Self {
        EngineError::Io(e.to_string())
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// How a source is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Delta,
    Parquet,
    Csv,
}

/// A table a `sql` task reads besides the warehouse's: `sources.<name> = { format, path }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub format: Format,
    /// A file or folder; relative paths are under the warehouse.
    pub path: String,
    /// CSV only: the first line names the columns.
    #[serde(default = "yes")]
    pub has_header: bool,
}

fn yes() -> bool {
    true
}

/// A table registered for one query, and what it costs to read all of it.
#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    pub name: String,
    pub format: Format,
    /// Bytes of the table's live data files (the baseline of projection pushdown, P12).
    pub file_bytes: u64,
    /// On Ballista, the folder of links to a Delta snapshot's files; removed with the last clone.
    #[serde(skip)]
    pub snapshot: Option<Arc<TempTree>>,
}

/// A folder removed when dropped.
#[derive(Debug)]
pub struct TempTree(PathBuf);

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The engine of this process: where the warehouse is, and how sessions are configured.
#[derive(Debug, Clone)]
pub struct Engine {
    pub warehouse: PathBuf,
    spill: PathBuf,
    memory_limit: usize,
    target_partitions: usize,
    batch_size: usize,
    /// The Ballista scheduler's URL when queries run on a cluster.
    ballista: Option<String>,
}

impl Engine {
    pub fn new(cfg: &EngineConfig, data_dir: &Path) -> Self {
        // Absolute, because Ballista's executors are other processes with their own cwd.
        let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        Self {
            ballista: match cfg.kind {
                EngineKind::Ballista => cfg.scheduler_url.clone(),
                EngineKind::Datafusion => None,
            },
            warehouse: data_dir.join(&cfg.warehouse),
            spill: data_dir.join(&cfg.spill_dir),
            memory_limit: usize::try_from(cfg.memory_limit_mb.saturating_mul(1024 * 1024))
                .unwrap_or(usize::MAX),
            target_partitions: cfg.target_partitions,
            batch_size: cfg.batch_size,
        }
    }

    #[cfg(test)]
    pub fn for_tests() -> Self {
        let dir = std::env::temp_dir().join(format!("bulwark-engine-{}", std::process::id()));
        Self::new(&EngineConfig::default(), &dir)
    }

    /// A session: the memory pool (spilling to `spill_dir` when bounded, with joins steered to
    /// the spillable sort-merge join, since DataFusion's hash join cannot spill — P11).
    pub fn session(&self) -> Result<SessionContext> {
        let mut config = SessionConfig::new().with_batch_size(self.batch_size);
        if self.target_partitions > 0 {
            config = config.with_target_partitions(self.target_partitions);
        }
        let mut rt = RuntimeEnvBuilder::new();
        if self.memory_limit > 0 {
            rt = rt.with_memory_pool(Arc::new(FairSpillPool::new(self.memory_limit)));
            config = config.set_bool("datafusion.optimizer.prefer_hash_join", false);
        }
        // delta-rs' own workaround: hash-join IN-list pushdown can panic on dictionary keys.
        config = config
            .set_usize("datafusion.optimizer.hash_join_inlist_pushdown_max_size", 0)
            .set_usize(
                "datafusion.optimizer.hash_join_inlist_pushdown_max_distinct_values",
                0,
            );
        std::fs::create_dir_all(&self.spill)?;
        rt = rt.with_temp_file_path(&self.spill);
        // Delta's planner, so that a Delta write or MERGE plans in this session (and its pool).
        let state = datafusion::execution::SessionStateBuilder::new()
            .with_default_features()
            .with_config(config)
            .with_runtime_env(rt.build_arc()?)
            .with_query_planner(deltalake::delta_datafusion::planner::DeltaPlanner::new())
            .build();
        Ok(SessionContext::new_with_state(state))
    }

    /// The scheduler URL when queries run on Ballista.
    pub fn ballista(&self) -> Option<&str> {
        self.ballista.as_deref()
    }

    /// The session a task's query runs in: [`Engine::session`] in process, or one whose plans
    /// run on the Ballista cluster (P11). Ballista ships the logical plan with every setting of
    /// this session; its executors apply their own memory pools.
    pub async fn query_session(&self) -> Result<SessionContext> {
        let Some(url) = &self.ballista else {
            return self.session();
        };
        // Staged results and Delta snapshot links go here even when the cluster spills.
        std::fs::create_dir_all(&self.spill)?;
        use ballista::prelude::{SessionConfigExt, SessionContextExt};
        let mut config = SessionConfig::new_with_ballista()
            .with_batch_size(self.batch_size)
            .with_ballista_job_name("bulwark-pipeline");
        if self.target_partitions > 0 {
            config = config.with_target_partitions(self.target_partitions);
        }
        let state = datafusion::execution::SessionStateBuilder::new()
            .with_default_features()
            .with_config(config)
            .build();
        Ok(SessionContext::remote_with_state(url, state).await?)
    }

    /// The folder of warehouse table `name`.
    pub fn table_path(&self, name: &str) -> PathBuf {
        self.warehouse.join(name)
    }

    /// Where a staged query result goes before checks and output.
    pub fn stage_path(&self) -> PathBuf {
        self.spill
            .join(format!("stage-{}.parquet", uuid::Uuid::new_v4().simple()))
    }

    /// Is there a warehouse table `name`?
    pub fn has_table(&self, name: &str) -> bool {
        valid_name(name).is_ok() && self.table_path(name).is_dir()
    }

    /// Register warehouse table `name` (Delta when it has a `_delta_log`, else a Parquet folder,
    /// hive-partitioned `k=v` folders read as string columns).
    pub async fn register_table(&self, ctx: &SessionContext, name: &str) -> Result<Registered> {
        let path = self.table_path(name);
        let format = if path.join("_delta_log").is_dir() {
            Format::Delta
        } else {
            Format::Parquet
        };
        self.register(
            ctx,
            name,
            &SourceSpec {
                format,
                path: path.display().to_string(),
                has_header: true,
            },
        )
        .await
    }

    /// Register a declared source under `name`.
    pub async fn register(
        &self,
        ctx: &SessionContext,
        name: &str,
        spec: &SourceSpec,
    ) -> Result<Registered> {
        let path = self.resolve(&spec.path);
        // A Parquet output is a symlink to its current version: read what it points at now.
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        if !path.exists() {
            return Err(EngineError::Invalid(format!(
                "source `{name}`: {} does not exist",
                path.display()
            )));
        }
        let text = path.display().to_string();
        let mut snapshot = None;
        let file_bytes = match spec.format {
            Format::Delta => {
                let table = open_delta(&path).await.map_err(|e| match e {
                    EngineError::Delta(m) => EngineError::Invalid(format!(
                        "source `{name}`: {} is not a Delta table ({m})",
                        path.display()
                    )),
                    other => other,
                })?;
                let bytes = delta_file_bytes(&table);
                if self.ballista.is_some() {
                    snapshot = Some(self.register_delta_files(ctx, name, &table).await?);
                } else {
                    table
                        .update_datafusion_session(&ctx.state())
                        .map_err(EngineError::from)?;
                    let provider = table.table_provider().await.map_err(EngineError::from)?;
                    ctx.register_table(name, provider)?;
                }
                bytes
            }
            Format::Parquet => {
                let mut opts = ParquetReadOptions::default();
                let parts = hive_partitions(&path);
                let cols: Vec<(String, arrow::datatypes::DataType)> = parts
                    .iter()
                    .map(|p| (p.clone(), arrow::datatypes::DataType::Utf8))
                    .collect();
                opts = opts.table_partition_cols(cols);
                ctx.register_parquet(name, &text, opts).await?;
                files_bytes(&path, "parquet")
            }
            Format::Csv => {
                let opts = CsvReadOptions::new().has_header(spec.has_header);
                ctx.register_csv(name, &text, opts).await?;
                files_bytes(&path, "csv")
            }
        };
        Ok(Registered {
            name: name.to_owned(),
            format: spec.format,
            file_bytes,
            snapshot,
        })
    }

    /// Ballista cannot ship delta-rs' scan to its executors, so a Delta table is read there as
    /// the Parquet files of its current snapshot: a folder of links to exactly those files (in
    /// their `k=v` partition folders), registered as a Parquet listing. Files the log has
    /// removed are not linked, so the read is the same snapshot the in-process engine sees.
    /// (Deletion vectors and column mapping, which our writers do not use, are not supported.)
    async fn register_delta_files(
        &self,
        ctx: &SessionContext,
        name: &str,
        table: &deltalake::DeltaTable,
    ) -> Result<Arc<TempTree>> {
        let root = self
            .spill
            .join(format!("snapshot-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root)?;
        let tree = Arc::new(TempTree(root.clone()));
        let state = table.snapshot().map_err(EngineError::from)?;
        let partitions = state.metadata().partition_columns().to_vec();
        let schema = state.snapshot().arrow_schema();
        let table_root = table.table_url().to_file_path().map_err(|()| {
            EngineError::Invalid(format!("source `{name}`: not a local Delta table"))
        })?;
        for uri in table.get_file_uris().map_err(EngineError::from)? {
            // delta-rs gives local files as plain paths, other stores as URLs.
            let file = match url::Url::parse(&uri) {
                Err(_) => PathBuf::from(&uri),
                Ok(u) => u.to_file_path().map_err(|()| {
                    EngineError::Invalid(format!(
                        "source `{name}`: {uri} is not a local file (Ballista reads local warehouses)"
                    ))
                })?,
            };
            let rel = file
                .strip_prefix(&table_root)
                .map_err(|_| EngineError::Io(format!("{} is outside its table", file.display())))?;
            let link = root.join(rel);
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::os::unix::fs::symlink(&file, &link)?;
        }
        let cols = partitions
            .iter()
            .map(|c| {
                let t = schema
                    .field_with_name(c)
                    .map(|f| f.data_type().clone())
                    .unwrap_or(arrow::datatypes::DataType::Utf8);
                (c.clone(), t)
            })
            .collect();
        let file_schema = arrow::datatypes::Schema::new(
            schema
                .fields()
                .iter()
                .filter(|f| !partitions.contains(f.name()))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let opts = ParquetReadOptions::default()
            .table_partition_cols(cols)
            .schema(&file_schema);
        // A listing puts partition columns last; a view over it keeps the Delta table's column
        // order, so `SELECT *` means the same on both engines (views ship to Ballista as SQL plans).
        let files = format!("{name}__delta_files");
        ctx.register_parquet(&files, root.display().to_string(), opts)
            .await?;
        let cols: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| format!("\"{}\"", f.name().replace('"', "\"\"")))
            .collect();
        ctx.sql(&format!(
            "CREATE VIEW {name} AS SELECT {} FROM {files}",
            cols.join(", ")
        ))
        .await?;
        Ok(tree)
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.warehouse.join(p)
        }
    }
}

/// Table names are plain identifiers, so a name can never climb out of the warehouse.
pub fn valid_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a table name (lower-case letters, digits and `_`, not starting \
             with a digit)"
        ))
    }
}

/// Open a Delta table at a local folder.
pub async fn open_delta(path: &Path) -> Result<deltalake::DeltaTable> {
    let url = dir_url(path)?;
    Ok(deltalake::open_table(url).await?)
}

pub fn dir_url(path: &Path) -> Result<url::Url> {
    let abs = std::path::absolute(path)?;
    url::Url::from_directory_path(&abs)
        .map_err(|()| EngineError::Io(format!("{} is not a usable path", abs.display())))
}

fn delta_file_bytes(table: &deltalake::DeltaTable) -> u64 {
    let Ok(uris) = table.get_file_uris() else {
        return 0;
    };
    uris.filter_map(|u| {
        let p = url::Url::parse(&u)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .unwrap_or_else(|| PathBuf::from(&u));
        std::fs::metadata(p).ok().map(|m| m.len())
    })
    .sum()
}

/// Bytes of the files ending in `.ext` under `path` (or of `path` itself).
fn files_bytes(path: &Path, ext: &str) -> u64 {
    if path.is_file() {
        return std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    let mut total = 0;
    let mut dirs = vec![path.to_owned()];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

/// The hive partition columns of a Parquet folder: `k` of its nested `k=v` folders.
fn hive_partitions(path: &Path) -> Vec<String> {
    let mut cols = Vec::new();
    let mut dir = path.to_owned();
    loop {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            break;
        };
        let next = rd.flatten().map(|e| e.path()).find(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains('=') && !n.starts_with('.'))
        });
        let Some(next) = next else { break };
        if let Some((k, _)) = next
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split_once('='))
        {
            cols.push(k.to_owned());
        }
        dir = next;
    }
    cols
}

/// The task types this part of the module provides (`sql`).
pub fn task_types(engine: &Engine) -> TaskTypes {
    let mut t = TaskTypes::new();
    let sql: Arc<dyn crate::exec::TaskType> = Arc::new(sql::SqlTask::new(engine.clone()));
    t.insert("sql".into(), sql);
    t
}

#[cfg(test)]
mod tests;
