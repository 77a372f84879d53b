//! Summaries (R4): per-day aggregates of warehouse tables, refreshed by the built-in pipeline
//! DAG `reporting_summaries` (one `reporting_summary` task per report) and stored in Bulwark's
//! own database (`reporting_summaries`), from which the report API answers through the cache.
//!
//! Why the OLTP database and not the key-value store: a report request reads a range of days,
//! which is one index range scan on `(report, day, grp)`, on SQLite and PostgreSQL alike; the
//! summaries are small (days × groups), and a refresh replaces its days in one transaction, so
//! a reader never sees half a refresh.
//!
//! **Only affected days are recomputed.** A report remembers the highest change LSN it has
//! folded in; a refresh asks the warehouse for the days of rows changed after it (tombstones
//! keep the deleted row's last values, so a delete names its day too), recomputes those days
//! and replaces them. The cost of a refresh follows what changed, and the DAG's interval bounds
//! how often it is paid. A `full` refresh (the backfill's) recomputes every day.
//!
//! Limits (docs/reporting.md): a row whose time column changes is re-summarised on its new day
//! only (the old day is corrected by the next full refresh); the LSN watermark assumes one sink
//! applies a table in stream order (the default: the sink is one durable consumer).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bulwark_pipeline::data::Engine;
use bulwark_pipeline::exec::{Job, LogSink, TaskFailure, TaskOutput, TaskType};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement, TransactionTrait, Value as DbValue};
use serde_json::{Value, json};
use thiserror::Error;

use crate::config::{ReportConfig, TimeUnit};
use crate::sink::{self, SinkError};

/// The task type the summary DAG's tasks have.
pub const TASK_TYPE: &str = "reporting_summary";
/// The built-in DAG's id.
pub const DAG_ID: &str = "reporting_summaries";

#[derive(Debug, Error)]
pub enum SummaryError {
    #[error("{0}")]
    Invalid(String),
    #[error("warehouse: {0}")]
    Warehouse(#[from] SinkError),
    #[error("bulwark database: {0}")]
    Db(#[from] sea_orm::DbErr),
}

type Result<T> = std::result::Result<T, SummaryError>;

/// Which days a refresh recomputes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The days of rows changed since the report's watermark (the scheduled refresh).
    Changed,
    /// Every day.
    Full,
    /// These days (`YYYY-MM-DD`), whatever changed: a backfill's range.
    Days(BTreeSet<String>),
}

/// What one refresh did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Refreshed {
    pub days: usize,
    pub rows: usize,
    /// The watermark after the refresh.
    pub lsn: i64,
    /// Set when there was nothing to read (no warehouse table yet).
    pub skipped: Option<String>,
}

fn quoted(c: &str) -> String {
    format!("\"{}\"", c.replace('"', "\"\""))
}

/// The UTC day of the time column, as a DataFusion expression.
fn day_expr(r: &ReportConfig) -> String {
    let c = quoted(&r.time_column);
    match r.time_unit {
        TimeUnit::Ms => format!("CAST(to_timestamp_millis({c}) AS DATE)"),
        TimeUnit::S => format!("CAST(to_timestamp_seconds({c}) AS DATE)"),
        TimeUnit::Us => format!("CAST(to_timestamp_micros({c}) AS DATE)"),
        TimeUnit::Timestamp => format!("CAST({c} AS DATE)"),
        TimeUnit::Date => c,
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A value the warehouse printed as text, back as JSON: numbers stay numbers.
fn json_value(v: Option<String>) -> Value {
    match v {
        None => Value::Null,
        Some(s) => serde_json::from_str::<serde_json::Number>(&s)
            .map(Value::Number)
            .unwrap_or(Value::String(s)),
    }
}

async fn warehouse_query(
    engine: &Engine,
    table: &str,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>> {
    // The only place the module reads the warehouse: the report API never does (R4).
    metrics::counter!("bulwark_reporting_warehouse_queries_total", "caller" => "summary")
        .increment(1);
    Ok(sink::query_text(engine, &[table], sql).await?)
}

fn st(db: &impl ConnectionTrait, sql: &str, values: Vec<DbValue>) -> Statement {
    Statement::from_sql_and_values(db.get_database_backend(), sql, values)
}

/// Fold what changed in `r.table` since the last refresh into report `name`'s summary.
pub async fn refresh(
    engine: &Engine,
    db: &DatabaseConnection,
    name: &str,
    r: &ReportConfig,
    scope: &Scope,
) -> Result<Refreshed> {
    let full = *scope == Scope::Full;
    if !engine.has_table(&r.table) {
        return Ok(Refreshed {
            skipped: Some(format!("the warehouse has no table `{}` yet", r.table)),
            ..Refreshed::default()
        });
    }
    let held: i64 = db
        .query_one(st(
            db,
            "SELECT lsn FROM reporting_summary_state WHERE report = $1",
            vec![name.into()],
        ))
        .await?
        .and_then(|row| row.try_get_by_index::<i64>(0).ok())
        .unwrap_or(-1);
    let since = if full { -1 } else { held };
    let day = day_expr(r);
    let t = quoted(&r.table);
    // Days touched since the watermark, and the newest LSN among them.
    // (A day range keeps the watermark: the changes after it are still to be folded in.)
    let touched = if matches!(scope, Scope::Days(_)) {
        Vec::new()
    } else {
        warehouse_query(
            engine,
            &r.table,
            &format!(
                "SELECT CAST({day} AS VARCHAR) AS d, CAST(max(_lsn) AS VARCHAR) AS l FROM {t} \
                 WHERE _lsn > {since} GROUP BY {day}"
            ),
        )
        .await?
    };
    let mut lsn = held.max(since);
    let mut days = match scope {
        Scope::Days(d) => d.clone(),
        Scope::Changed | Scope::Full => BTreeSet::new(),
    };
    for row in &touched {
        if let Some(l) = row
            .get(1)
            .cloned()
            .flatten()
            .and_then(|s| s.parse::<i64>().ok())
        {
            lsn = lsn.max(l);
        }
        if let Some(d) = row.first().cloned().flatten()
            && *scope == Scope::Changed
        {
            days.insert(d);
        }
    }
    if days.is_empty() && !full {
        return Ok(Refreshed {
            lsn,
            ..Refreshed::default()
        });
    }
    let groups: Vec<String> = r.group_by.iter().map(|g| quoted(g)).collect();
    let mut select = vec![format!("CAST({day} AS VARCHAR) AS d")];
    select.extend(
        groups
            .iter()
            .enumerate()
            .map(|(i, g)| format!("CAST({g} AS VARCHAR) AS g{i}")),
    );
    select.extend(
        r.metrics
            .values()
            .enumerate()
            .map(|(i, e)| format!("CAST({e} AS VARCHAR) AS m{i}")),
    );
    let mut group_by = vec![day.clone()];
    group_by.extend(groups.iter().cloned());
    let filter = if full {
        String::new()
    } else {
        let list = days
            .iter()
            .map(|d| format!("'{}'", d.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ");
        format!(" AND CAST({day} AS VARCHAR) IN ({list})")
    };
    let rows = warehouse_query(
        engine,
        &r.table,
        &format!(
            "SELECT {} FROM {t} WHERE NOT _deleted AND {} IS NOT NULL{filter} GROUP BY {}",
            select.join(", "),
            quoted(&r.time_column),
            group_by.join(", ")
        ),
    )
    .await
    .map_err(|e| SummaryError::Invalid(format!("report `{name}`: {e}")))?;
    let at = now_ms();
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        let mut it = row.into_iter();
        let Some(Some(d)) = it.next() else { continue };
        let grp: BTreeMap<&str, Value> = r
            .group_by
            .iter()
            .map(|g| (g.as_str(), json_value(it.next().flatten())))
            .collect();
        let metrics: BTreeMap<&str, Value> = r
            .metrics
            .keys()
            .map(|m| (m.as_str(), json_value(it.next().flatten())))
            .collect();
        records.push((d, json!(grp).to_string(), json!(metrics).to_string()));
    }
    let n_days = if full {
        records.iter().map(|r| &r.0).collect::<BTreeSet<_>>().len()
    } else {
        days.len()
    };
    let tx = db.begin().await?;
    bulwark_kernel::db::lock_for_write(&tx).await?;
    if full {
        tx.execute(st(
            &tx,
            "DELETE FROM reporting_summaries WHERE report = $1",
            vec![name.into()],
        ))
        .await?;
    } else {
        let days: Vec<&String> = days.iter().collect();
        for chunk in days.chunks(200) {
            let marks = (0..chunk.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let mut values: Vec<DbValue> = vec![name.into()];
            values.extend(chunk.iter().map(|d| DbValue::from((*d).clone())));
            tx.execute(st(
                &tx,
                &format!("DELETE FROM reporting_summaries WHERE report = $1 AND day IN ({marks})"),
                values,
            ))
            .await?;
        }
    }
    for chunk in records.chunks(200) {
        let mut marks = Vec::with_capacity(chunk.len());
        let mut values: Vec<DbValue> = Vec::with_capacity(chunk.len() * 5);
        for (i, (d, g, m)) in chunk.iter().enumerate() {
            let b = i * 5;
            marks.push(format!(
                "(${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5
            ));
            values.extend([
                name.into(),
                d.clone().into(),
                g.clone().into(),
                m.clone().into(),
                at.into(),
            ]);
        }
        tx.execute(st(
            &tx,
            &format!(
                "INSERT INTO reporting_summaries (report, day, grp, metrics, refreshed_at_ms) \
                 VALUES {}",
                marks.join(", ")
            ),
            values,
        ))
        .await?;
    }
    tx.execute(st(
        &tx,
        "INSERT INTO reporting_summary_state (report, lsn, days, refreshed_at_ms) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (report) DO UPDATE SET lsn = excluded.lsn, \
         days = excluded.days, refreshed_at_ms = excluded.refreshed_at_ms",
        vec![
            name.into(),
            lsn.into(),
            i64::try_from(n_days).unwrap_or(i64::MAX).into(),
            at.into(),
        ],
    ))
    .await?;
    tx.commit().await?;
    Ok(Refreshed {
        days: n_days,
        rows: records.len(),
        lsn,
        skipped: None,
    })
}

/// The `reporting_summary` task: `{"report": NAME, "full": false}`.
pub struct SummaryTask {
    pub engine: Engine,
    pub db: DatabaseConnection,
    pub reports: Arc<BTreeMap<String, ReportConfig>>,
    /// The report API's cache; a refresh drops the report's cached ranges (by tag).
    pub cache: Option<Arc<bulwark_cache::Cache>>,
    pub namespace: String,
}

fn report_arg(args: &Value) -> std::result::Result<(&str, bool), String> {
    let name = args
        .get("report")
        .and_then(Value::as_str)
        .ok_or("report: required, the name of a `[reporting.reports.NAME]`")?;
    let full = match args.get("full") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("full: must be true or false".into()),
    };
    Ok((name, full))
}

#[async_trait::async_trait]
impl TaskType for SummaryTask {
    fn name(&self) -> &'static str {
        TASK_TYPE
    }

    fn validate(
        &self,
        args: &Value,
        _dag: &bulwark_pipeline::dag::Dag,
    ) -> std::result::Result<(), String> {
        let (name, _) = report_arg(args)?;
        if !self.reports.contains_key(name) {
            return Err(format!("report: no report `{name}` in [reporting.reports]"));
        }
        Ok(())
    }

    async fn run(
        &self,
        _job: &Job,
        args: &Value,
        log: &LogSink,
    ) -> std::result::Result<TaskOutput, TaskFailure> {
        let (name, full) = report_arg(args).map_err(TaskFailure::new)?;
        let r = self
            .reports
            .get(name)
            .ok_or_else(|| TaskFailure::new(format!("no report `{name}`")))?;
        let started = std::time::Instant::now();
        let scope = if full { Scope::Full } else { Scope::Changed };
        let done = refresh(&self.engine, &self.db, name, r, &scope)
            .await
            .map_err(|e| TaskFailure::new(e.to_string()))?;
        if let Some(why) = &done.skipped {
            log.line(format!("report {name}: nothing to summarise: {why}"));
        } else {
            log.line(format!(
                "report {name}: {} day(s) recomputed, {} summary row(s), watermark LSN {}, in {:?}",
                done.days,
                done.rows,
                done.lsn,
                started.elapsed()
            ));
        }
        metrics::gauge!("bulwark_reporting_report_refreshed_timestamp_seconds", "report" => name.to_owned())
            .set(now_ms() as f64 / 1e3);
        metrics::counter!("bulwark_reporting_report_days_refreshed_total", "report" => name.to_owned())
            .increment(done.days as u64);
        if done.days > 0
            && let Some(cache) = &self.cache
            && let Err(e) = cache.invalidate_tag(&self.namespace, name).await
        {
            // The cached ranges expire by their TTL anyway.
            log.line(format!("report {name}: cache invalidation failed: {e}"));
        }
        Ok(TaskOutput {
            details: Some(json!({
                "report": name,
                "days": done.days,
                "rows": done.rows,
                "lsn": done.lsn,
                "skipped": done.skipped,
            })),
            ..TaskOutput::default()
        })
    }
}
