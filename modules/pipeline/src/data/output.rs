//! Where a `sql` task's result goes (P8, P14).
//!
//! Delta tables through `deltalake`: every commit carries an application transaction (app id
//! `dag.task`, version = the logical date in Unix seconds), so the table itself records which
//! logical date each task last wrote.
//! * `overwrite_partition` replaces the rows matching `replace_where` (default: the one
//!   partition column equals the run's `ds`) in one commit — INSERT OVERWRITE: a rerun is a
//!   clean replace, never a duplicate; writers of other partitions are not disturbed.
//! * `merge` upserts by `keys` (and deletes where `delete_if` holds); a rerun whose
//!   application transaction the table already holds is a no-op.
//! * `append`, `overwrite`: the plain modes. New columns merge into the table's schema; old
//!   rows read them as null (P12).
//!
//! Parquet outputs are written to a new folder and swapped in by renaming a symlink, one
//! atomic step: a reader sees the old files or the new, never a half-written table.

use std::sync::Arc;

use datafusion::prelude::DataFrame;
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::write::{SchemaMode, WriteBuilder};
use deltalake::protocol::SaveMode;
use serde::{Deserialize, Serialize};

use super::{Engine, EngineError, Result, dir_url, valid_name};
use crate::exec::Job;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutFormat {
    #[default]
    Delta,
    Parquet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Overwrite,
    OverwritePartition,
    Append,
    Merge,
}

/// `[tasks.<id>.output]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The warehouse table written (`<warehouse>/<table>`).
    pub table: String,
    #[serde(default)]
    pub format: OutFormat,
    #[serde(default)]
    pub mode: Mode,
    /// Partition columns of a new Delta table.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// `overwrite_partition`: the rows replaced, as SQL (templated).
    #[serde(default)]
    pub replace_where: Option<String>,
    /// `merge`: the key columns.
    #[serde(default)]
    pub keys: Vec<String>,
    /// `merge`: delete the matching target row where this holds, as SQL over `source.<col>`.
    #[serde(default)]
    pub delete_if: Option<String>,
}

impl OutputSpec {
    pub fn validate(&self) -> std::result::Result<(), String> {
        valid_name(&self.table).map_err(|m| format!("table: {m}"))?;
        if self.format == OutFormat::Parquet && self.mode != Mode::Overwrite {
            return Err(
                "mode: a Parquet output is replaced whole (`overwrite`); use a Delta table for \
                 partition overwrite, append and merge"
                    .into(),
            );
        }
        match self.mode {
            Mode::OverwritePartition
                if self.replace_where.is_none() && self.partition_by.len() != 1 =>
            {
                return Err(
                    "replace_where: `overwrite_partition` needs `replace_where`, or \
                            exactly one `partition_by` column (then it is `<col> = '{{ ds }}'`)"
                        .into(),
                );
            }
            Mode::Merge if self.keys.is_empty() => {
                return Err("keys: `merge` needs the key columns".into());
            }
            _ => {}
        }
        if self.delete_if.is_some() && self.mode != Mode::Merge {
            return Err("delete_if: only a `merge` output deletes".into());
        }
        for c in self.partition_by.iter().chain(&self.keys) {
            if c.is_empty() || !c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                return Err(format!("`{c}` is not a plain column name"));
            }
        }
        Ok(())
    }
}

fn version_of(t: &deltalake::DeltaTable) -> Option<i64> {
    t.version().and_then(|v| i64::try_from(v).ok())
}

/// What a write did, stored with the try.
#[derive(Debug, Clone, Serialize)]
pub struct Commit {
    pub table: String,
    pub format: OutFormat,
    pub mode: Mode,
    pub rows: u64,
    /// The Delta version committed (none for Parquet, or a skipped merge).
    pub version: Option<i64>,
    pub app_id: String,
    pub txn_version: i64,
    /// A merge the table had already applied (its application transaction was there).
    pub skipped: bool,
}

impl Commit {
    pub fn summary(&self) -> String {
        if self.skipped {
            return format!(
                "{}: already holds {} version {}; nothing written",
                self.table, self.app_id, self.txn_version
            );
        }
        format!(
            "wrote {} rows to {} ({:?} {:?}{})",
            self.rows,
            self.table,
            self.format,
            self.mode,
            self.version
                .map(|v| format!(", Delta version {v}"))
                .unwrap_or_default()
        )
    }
}

/// The application transaction's version of a logical date: its Unix seconds.
pub fn txn_version(job: &Job) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&job.logical_date).map_or(0, |d| d.timestamp())
}

fn ds(job: &Job) -> String {
    job.logical_date.chars().take(10).collect()
}

fn props(job: &Job, app_id: &str) -> CommitProperties {
    CommitProperties::default()
        .with_application_transaction(Transaction::new(app_id, txn_version(job)))
        .with_metadata([
            ("bulwark.run_id".to_owned(), serde_json::json!(job.run_id)),
            (
                "bulwark.try_number".to_owned(),
                serde_json::json!(job.try_number),
            ),
        ])
}

/// Write `df` as `spec` says.
pub async fn write(engine: &Engine, df: DataFrame, spec: &OutputSpec, job: &Job) -> Result<Commit> {
    let rows = df.clone().count().await? as u64;
    let app_id = format!("{}.{}", job.dag_id, job.task_id);
    let mut commit = Commit {
        table: spec.table.clone(),
        format: spec.format,
        mode: spec.mode,
        rows,
        version: None,
        app_id: app_id.clone(),
        txn_version: txn_version(job),
        skipped: false,
    };
    match spec.format {
        OutFormat::Parquet => {
            parquet_swap(engine, df, &spec.table).await?;
            Ok(commit)
        }
        OutFormat::Delta => {
            let (version, skipped) = write_delta(engine, df, spec, job, &app_id).await?;
            commit.version = version;
            commit.skipped = skipped;
            Ok(commit)
        }
    }
}

async fn write_delta(
    engine: &Engine,
    df: DataFrame,
    spec: &OutputSpec,
    job: &Job,
    app_id: &str,
) -> Result<(Option<i64>, bool)> {
    let path = engine.table_path(&spec.table);
    std::fs::create_dir_all(&path)?;
    let mut table = deltalake::DeltaTable::try_from_url(dir_url(&path)?).await?;
    let exists = table.version().is_some();
    if exists && spec.mode != Mode::Overwrite {
        let stored = table.snapshot()?.snapshot().arrow_schema();
        numeric_types_match(&spec.table, &stored, df.schema().as_arrow())?;
    }
    if spec.mode == Mode::Merge {
        if exists {
            let held = table
                .snapshot()?
                .transaction_version(table.log_store().as_ref(), app_id)
                .await?;
            if held == Some(txn_version(job)) {
                return Ok((version_of(&table), true));
            }
        } else {
            // Create the table, empty, with the source's schema: the merge below fills it.
            let schema = Arc::new(df.schema().as_arrow().clone());
            table = table
                .write(vec![arrow::array::RecordBatch::new_empty(schema)])
                .with_save_mode(SaveMode::Append)
                .with_partition_columns(spec.partition_by.clone())
                .await?;
        }
        return merge(table, df, spec, props(job, app_id)).await;
    }
    let (state, plan) = df.into_parts();
    let snapshot = table.snapshot().ok().map(|s| s.snapshot().clone());
    let mut w = WriteBuilder::new(table.log_store(), snapshot)
        .with_input_plan(plan)
        .with_session_state(Arc::new(state))
        .with_commit_properties(props(job, app_id));
    if !spec.partition_by.is_empty() {
        w = w.with_partition_columns(spec.partition_by.clone());
    }
    w = match spec.mode {
        Mode::Overwrite => w
            .with_save_mode(SaveMode::Overwrite)
            .with_schema_mode(SchemaMode::Overwrite),
        Mode::Append => w
            .with_save_mode(SaveMode::Append)
            .with_schema_mode(SchemaMode::Merge),
        Mode::OverwritePartition => {
            let predicate = spec
                .replace_where
                .clone()
                .unwrap_or_else(|| format!("{} = '{}'", spec.partition_by[0], ds(job)));
            let w = w
                .with_save_mode(SaveMode::Overwrite)
                .with_replace_where(predicate);
            if exists {
                w.with_schema_mode(SchemaMode::Merge)
            } else {
                w
            }
        }
        Mode::Merge => w,
    };
    let t = w.await?;
    Ok((version_of(&t), false))
}

/// A numeric column must keep its stored type (P12). Delta lets a type widen (int → bigint)
/// only with the `typeWidening` table feature, which delta-rs 1.1 neither writes nor reads; left
/// alone, delta-rs casts each value to the stored type and fails on the first day one does not
/// fit. Refusing the changed type up front makes that a failure of the change, not of the data.
fn numeric_types_match(
    table: &str,
    stored: &arrow::datatypes::Schema,
    new: &arrow::datatypes::Schema,
) -> Result<()> {
    for f in new.fields() {
        let Ok(old) = stored.field_with_name(f.name()) else {
            continue; // a new column: schema evolution adds it
        };
        let (a, b) = (old.data_type(), f.data_type());
        if a != b && a.is_numeric() && b.is_numeric() {
            return Err(EngineError::Invalid(format!(
                "output: column `{}` of the query is {b}, but table `{table}` stores {a}; Delta \
                 changes a column's type only with the typeWidening table feature, which \
                 delta-rs 1.1 does not support: CAST it to {a} in the query, or write a new table \
                 (mode = \"overwrite\" replaces the table and its schema)",
                f.name()
            )));
        }
    }
    Ok(())
}

async fn merge(
    table: deltalake::DeltaTable,
    df: DataFrame,
    spec: &OutputSpec,
    props: CommitProperties,
) -> Result<(Option<i64>, bool)> {
    let cols: Vec<String> = df
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let on: Vec<String> = spec
        .keys
        .iter()
        .map(|k| format!("target.{k} = source.{k}"))
        .collect();
    let keep = spec.delete_if.as_ref().map(|d| format!("NOT ({d})"));
    let mut m = table
        .merge(df, on.join(" AND "))
        .with_source_alias("source")
        .with_target_alias("target")
        .with_merge_schema(true)
        .with_commit_properties(props);
    if let Some(d) = &spec.delete_if {
        let d = d.clone();
        m = m.when_matched_delete(|del| del.predicate(d))?;
    }
    let (c1, k1) = (cols.clone(), keep.clone());
    m = m.when_matched_update(move |mut u| {
        if let Some(k) = k1 {
            u = u.predicate(k);
        }
        for c in &c1 {
            u = u.update(c.as_str(), format!("source.{c}"));
        }
        u
    })?;
    m = m.when_not_matched_insert(move |mut i| {
        if let Some(k) = keep {
            i = i.predicate(k);
        }
        for c in &cols {
            i = i.set(c.as_str(), format!("source.{c}"));
        }
        i
    })?;
    let (t, _metrics) = m.await?;
    Ok((version_of(&t), false))
}

/// Quarantined rows go to `<table>_quarantine`, partitioned by the logical date; a rerun
/// replaces its date's rows.
pub async fn write_quarantine(
    engine: &Engine,
    df: DataFrame,
    out: &OutputSpec,
    job: &Job,
) -> Result<Commit> {
    let spec = OutputSpec {
        table: format!("{}_quarantine", out.table),
        format: OutFormat::Delta,
        mode: Mode::OverwritePartition,
        partition_by: vec!["_logical_date".into()],
        replace_where: Some(format!(
            "_logical_date = '{}'",
            job.logical_date.replace('\'', "''")
        )),
        keys: Vec::new(),
        delete_if: None,
    };
    write(engine, df, &spec, job).await
}

/// Replace a Parquet table whole: new files in a fresh folder, then a symlink renamed over the
/// table's name (rename is atomic); the previous version is kept for readers mid-scan, older
/// ones removed.
async fn parquet_swap(engine: &Engine, df: DataFrame, table: &str) -> Result<()> {
    let versions = engine.warehouse.join(".versions").join(table);
    let id = format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f"),
        uuid::Uuid::new_v4().simple()
    );
    let dir = versions.join(&id);
    std::fs::create_dir_all(&dir)?;
    df.write_parquet(
        &dir.join("part-00000.parquet").display().to_string(),
        datafusion::dataframe::DataFrameWriteOptions::new().with_single_file_output(true),
        None,
    )
    .await?;
    let target = engine.table_path(table);
    if target.exists() && !target.is_symlink() {
        return Err(EngineError::Invalid(format!(
            "output: {} exists and is not a Parquet output of this engine",
            target.display()
        )));
    }
    let link = engine.warehouse.join(format!(".{table}.link-{id}"));
    std::os::unix::fs::symlink(&dir, &link)?;
    std::fs::rename(&link, &target)?;
    let mut old: Vec<_> = std::fs::read_dir(&versions)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p != &dir)
        .collect();
    old.sort();
    // Names sort by time: keep the newest previous one.
    old.pop();
    for p in old {
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(())
}
