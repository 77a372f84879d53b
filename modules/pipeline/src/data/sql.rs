//! The `sql` task type: a DataFusion SQL query over the warehouse's tables and declared sources,
//! its result checked ([`super::checks`]) and written ([`super::output`]).
//!
//! The query runs once: its result is streamed to a staged Parquet file (memory stays within
//! the pool, P11), the checks aggregate over the stage in one scan, and the output reads the
//! stage (less the quarantined rows). What the try read is taken from the plan's own metrics:
//! `bytes_scanned` of the scans against the bytes of the tables' files (P12).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::checks::{self, Check};
use super::output::{self, OutputSpec};
use super::{Engine, EngineError, Registered, Result, SourceSpec};
use crate::dag::{Dag, TaskKind};
use crate::exec::{Job, LogSink, TaskFailure, TaskOutput, TaskType};

/// A `sql` task's arguments (`[tasks.<id>]` keys besides the common ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlArgs {
    /// One SELECT (or WITH ... SELECT); templated with the run's context.
    pub query: String,
    /// Tables read besides the warehouse's, by the name the query uses.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceSpec>,
    /// Where the result goes; none for a task that only checks.
    #[serde(default)]
    pub output: Option<OutputSpec>,
    /// Quality checks on the result, before it is written (P10).
    #[serde(default)]
    pub checks: Vec<Check>,
    /// Allow `now()`, `random()` and other functions whose result is not a function of the
    /// inputs (P13: refused otherwise, so a rerun gives the same output).
    #[serde(default)]
    pub nondeterministic: bool,
}

impl SqlArgs {
    pub fn parse(args: &serde_json::Value) -> std::result::Result<Self, String> {
        serde_json::from_value(args.clone()).map_err(|e| e.to_string())
    }
}

/// Functions that read the clock (stable within a query, but not across reruns).
const CLOCK: &[&str] = &[
    "now",
    "current_date",
    "current_time",
    "current_timestamp",
    "localtimestamp",
    "localtime",
    "today",
];

pub struct SqlTask {
    engine: Engine,
}

impl SqlTask {
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

/// The names a query reads (CTEs excluded), or the parser's message.
pub fn referenced_tables(
    ctx: &SessionContext,
    query: &str,
) -> std::result::Result<Vec<String>, String> {
    let state = ctx.state();
    let stmt = state
        .sql_to_statement(query, &datafusion::config::Dialect::Generic)
        .map_err(|e| format!("query: {}", e.find_root()))?;
    let refs = state
        .resolve_table_references(&stmt)
        .map_err(|e| format!("query: {}", e.find_root()))?;
    let functions = state.table_functions();
    let mut names: Vec<String> = refs
        .iter()
        .map(|r| r.table().to_owned())
        .filter(|t| !functions.contains_key(t))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Functions in `plan` whose result a rerun would not reproduce.
pub fn nondeterministic_functions(plan: &LogicalPlan) -> Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|x| {
                if let Expr::ScalarFunction(f) = x {
                    let name = f.func.name();
                    if f.func.signature().volatility == Volatility::Volatile
                        || CLOCK.contains(&name)
                    {
                        found.insert(name.to_owned());
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })?;
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(found)
}

/// The tables the DAG's other `sql` tasks write: what a query may read from upstream.
fn dag_outputs(dag: &Dag) -> BTreeSet<String> {
    dag.tasks
        .iter()
        .filter_map(|t| match &t.kind {
            TaskKind::Plugin { type_name, args } if type_name == "sql" => {
                SqlArgs::parse(args).ok()?.output.map(|o| o.table)
            }
            _ => None,
        })
        .flat_map(|t| [format!("{t}_quarantine"), t])
        .collect()
}

/// Render a task's templates against a sample context, for checks that need concrete text.
fn sample(text: &str) -> String {
    use chrono::TimeZone as _;
    let start = chrono::Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    let ctx = crate::template::RunContext {
        dag_id: "dag".into(),
        task_id: "task".into(),
        run_id: "manual__sample".into(),
        logical_date: start,
        interval: crate::schedule::DataInterval {
            start,
            end: start + chrono::Duration::days(1),
        },
        try_number: 1,
        tz: chrono_tz::UTC,
        conf: serde_json::json!({}),
    };
    crate::template::render(text, &ctx).unwrap_or_else(|_| text.to_owned())
}

#[async_trait::async_trait]
impl TaskType for SqlTask {
    fn name(&self) -> &'static str {
        "sql"
    }

    fn validate(&self, args: &serde_json::Value, dag: &Dag) -> std::result::Result<(), String> {
        let a = SqlArgs::parse(args)?;
        for name in a.sources.keys() {
            super::valid_name(name).map_err(|m| format!("sources: {m}"))?;
        }
        if let Some(o) = &a.output {
            o.validate().map_err(|m| format!("output: {m}"))?;
        }
        for (i, c) in a.checks.iter().enumerate() {
            c.validate().map_err(|m| format!("checks[{i}]: {m}"))?;
        }
        if a.checks
            .iter()
            .any(|c| c.policy == checks::Policy::Quarantine)
            && a.output.is_none()
        {
            return Err(
                "checks: the `quarantine` policy needs an `output` (bad rows go to \
                        `<output>_quarantine`, good rows to the output)"
                    .into(),
            );
        }
        let ctx = SessionContext::new();
        let tables = referenced_tables(&ctx, &sample(&a.query))?;
        let upstream = dag_outputs(dag);
        let unknown: Vec<&String> = tables
            .iter()
            .filter(|t| {
                !a.sources.contains_key(*t) && !upstream.contains(*t) && !self.engine.has_table(t)
            })
            .collect();
        if !unknown.is_empty() {
            let list: Vec<String> = unknown.iter().map(|t| format!("`{t}`")).collect();
            return Err(format!(
                "query: unknown table {} (not in `sources`, not written by a task of this DAG, \
                 not in the warehouse {})",
                list.join(", "),
                self.engine.warehouse.display()
            ));
        }
        Ok(())
    }

    async fn run(
        &self,
        job: &Job,
        args: &serde_json::Value,
        log: &LogSink,
    ) -> std::result::Result<TaskOutput, TaskFailure> {
        let a = SqlArgs::parse(args).map_err(|m| TaskFailure::new(format!("arguments: {m}")))?;
        let started = std::time::Instant::now();
        let r = run_sql(&self.engine, job, &a, log).await;
        #[allow(clippy::cast_precision_loss)]
        metrics::histogram!("bulwark_pipeline_sql_seconds", "dag" => job.dag_id.clone())
            .record(started.elapsed().as_secs_f64());
        match r {
            Ok(details) => Ok(TaskOutput {
                // A table written (not a merge it already held) is a new version of that
                // dataset: DAGs scheduled on it run, sensors waiting for it fire.
                datasets: details["output"]
                    .as_object()
                    .filter(|o| o.get("skipped") != Some(&serde_json::Value::Bool(true)))
                    .and_then(|o| o.get("table"))
                    .and_then(serde_json::Value::as_str)
                    .map(|t| vec![t.to_owned()])
                    .unwrap_or_default(),
                details: Some(details),
                ..TaskOutput::default()
            }),
            Err((e, details)) => Err(TaskFailure {
                message: e.to_string(),
                exit_code: None,
                details,
            }),
        }
    }
}

type RunError = (EngineError, Option<serde_json::Value>);

/// A task's query, planned in a fresh session with its tables registered.
pub struct Planned {
    pub ctx: SessionContext,
    pub plan: LogicalPlan,
    pub tables: Vec<Registered>,
    /// The plan runs on the Ballista cluster (else in this process).
    pub on_cluster: bool,
}

/// Plan a task's query in a fresh session with its tables registered. On Ballista, a query
/// that reads no table (only `VALUES` or table functions such as `generate_series`, which
/// Ballista cannot ship) has nothing to distribute and runs in process.
pub async fn plan(engine: &Engine, a: &SqlArgs) -> Result<Planned> {
    let local = engine.session()?;
    let tables = referenced_tables(&local, &a.query).map_err(EngineError::Invalid)?;
    let on_cluster = engine.ballista().is_some() && !tables.is_empty();
    let ctx = if on_cluster {
        engine.query_session().await?
    } else {
        local
    };
    let mut registered = Vec::new();
    for t in &tables {
        let r = if let Some(spec) = a.sources.get(t) {
            engine.register(&ctx, t, spec).await?
        } else if engine.has_table(t) {
            engine.register_table(&ctx, t).await?
        } else {
            return Err(EngineError::Invalid(format!(
                "query: no table `{t}` (not in `sources`, not in the warehouse {})",
                engine.warehouse.display()
            )));
        };
        registered.push(r);
    }
    let state = ctx.state();
    let stmt = state.sql_to_statement(&a.query, &datafusion::config::Dialect::Generic)?;
    let plan = state.statement_to_plan(stmt).await?;
    if !matches!(
        plan,
        LogicalPlan::Projection(_)
            | LogicalPlan::Aggregate(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Union(_)
            | LogicalPlan::Distinct(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::TableScan(_)
            | LogicalPlan::Values(_)
            | LogicalPlan::Join(_)
    ) {
        return Err(EngineError::Invalid(
            "query: a `sql` task runs one SELECT; its output is declared in `output`".into(),
        ));
    }
    if !a.nondeterministic {
        let found = nondeterministic_functions(&plan)?;
        if !found.is_empty() {
            let list: Vec<String> = found.iter().map(|f| format!("{f}()")).collect();
            return Err(EngineError::Invalid(format!(
                "query: {} would give a rerun a different result (P13); use the run's \
                 `{{{{ ts }}}}`/`{{{{ ds }}}}`, or set `nondeterministic = true`",
                list.join(", ")
            )));
        }
    }
    Ok(Planned {
        ctx,
        plan,
        tables: registered,
        on_cluster,
    })
}

/// `bulwark pipeline explain`: the optimised logical and the physical plan.
pub async fn explain(engine: &Engine, a: &SqlArgs) -> Result<String> {
    let Planned { ctx, plan, .. } = plan(engine, a).await?;
    let df = ctx.execute_logical_plan(plan).await?;
    let batches = df.explain(false, false)?.collect().await?;
    Ok(arrow::util::pretty::pretty_format_batches(&batches)
        .map_err(|e| EngineError::Query(e.to_string()))?
        .to_string())
}

async fn run_sql(
    engine: &Engine,
    job: &Job,
    a: &SqlArgs,
    log: &LogSink,
) -> std::result::Result<serde_json::Value, RunError> {
    let plain = |e: EngineError| (e, None);
    let Planned {
        ctx,
        plan,
        tables: registered,
        on_cluster,
    } = plan(engine, a).await.map_err(plain)?;
    let file_bytes: u64 = registered.iter().map(|r| r.file_bytes).sum();
    log.line(format!(
        "reading {}",
        registered
            .iter()
            .map(|r| format!("{} ({:?}, {} bytes)", r.name, r.format, r.file_bytes))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let df = ctx
        .execute_logical_plan(plan)
        .await
        .map_err(|e| plain(e.into()))?;
    let physical = df
        .create_physical_plan()
        .await
        .map_err(|e| plain(e.into()))?;
    let stage = engine.stage_path();
    let _cleanup = RemoveOnDrop(stage.clone());
    let rows = stage_result(&ctx, physical.clone(), &stage)
        .await
        .map_err(plain)?;
    // Ballista runs the scan on its executors, whose metrics do not come back to this plan.
    let bytes_scanned = (!on_cluster).then(|| scanned_bytes(physical.as_ref()));
    log.line(match bytes_scanned {
        Some(b) => format!("query: {rows} rows; scanned {b} of {file_bytes} file bytes"),
        None => format!(
            "query: {rows} rows on Ballista ({file_bytes} file bytes; bytes scanned are not \
             reported by the cluster)"
        ),
    });
    if let Some(b) = bytes_scanned {
        metrics::counter!("bulwark_pipeline_sql_bytes_scanned_total", "dag" => job.dag_id.clone())
            .increment(b);
    }
    metrics::counter!("bulwark_pipeline_sql_file_bytes_total", "dag" => job.dag_id.clone())
        .increment(file_bytes);
    let mut details = serde_json::json!({
        "rows": rows,
        "bytes_scanned": bytes_scanned,
        "file_bytes": file_bytes,
        "tables": registered,
        "engine": if on_cluster { "ballista" } else { "datafusion" },
    });
    // Checks, quarantine and outputs read the staged result here, in process: on Ballista in a
    // local session (Delta writes plan in it), in process in the query's own session.
    let ctx = if on_cluster {
        engine.session().map_err(plain)?
    } else {
        ctx
    };
    ctx.register_parquet(
        checks::STAGED,
        stage.display().to_string(),
        datafusion::prelude::ParquetReadOptions::default(),
    )
    .await
    .map_err(|e| plain(e.into()))?;
    let staged = ctx
        .table(checks::STAGED)
        .await
        .map_err(|e| plain(e.into()))?;
    let gate = checks::evaluate(&ctx, &a.checks, job, rows)
        .await
        .map_err(plain)?;
    details["checks"] = serde_json::to_value(&gate.results).unwrap_or_default();
    for r in &gate.results {
        log.line(r.summary());
        metrics::counter!("bulwark_pipeline_checks_total",
            "dag" => job.dag_id.clone(), "policy" => r.policy.as_str(),
            "severity" => r.severity.as_str(), "outcome" => if r.passed { "pass" } else { "fail" })
        .increment(1);
    }
    let mut good = staged;
    if let (Some(out), Some(bad)) = (&a.output, &gate.quarantine_predicate) {
        let q = checks::quarantine_frame(&ctx, bad, &gate.reasons_expr, job)
            .await
            .map_err(|e| (e, Some(details.clone())))?;
        let commit = output::write_quarantine(engine, q, out, job)
            .await
            .map_err(|e| (e, Some(details.clone())))?;
        log.line(format!(
            "quarantined {} rows in {}",
            commit.rows, commit.table
        ));
        details["quarantine"] = serde_json::to_value(&commit).unwrap_or_default();
        good = ctx
            .sql(&format!(
                "SELECT * FROM {} WHERE NOT ({bad})",
                checks::STAGED
            ))
            .await
            .map_err(|e| (e.into(), Some(details.clone())))?;
    }
    if let Some(failed) = gate.failure() {
        return Err((EngineError::Invalid(failed), Some(details)));
    }
    if let Some(out) = &a.output {
        let commit = output::write(engine, good, out, job)
            .await
            .map_err(|e| (e, Some(details.clone())))?;
        log.line(commit.summary());
        details["output"] = serde_json::to_value(&commit).unwrap_or_default();
    }
    Ok(details)
}

/// Stream the plan's result to a Parquet file; the row count.
async fn stage_result(
    ctx: &SessionContext,
    plan: Arc<dyn ExecutionPlan>,
    path: &std::path::Path,
) -> Result<u64> {
    let file = tokio::fs::File::create(path).await?;
    let mut writer = parquet::arrow::AsyncArrowWriter::try_new(file, plan.schema(), None)
        .map_err(|e| EngineError::Io(format!("staging: {e}")))?;
    let mut stream = datafusion::physical_plan::execute_stream(plan, ctx.task_ctx())?;
    let mut rows = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        rows += batch.num_rows() as u64;
        writer
            .write(&batch)
            .await
            .map_err(|e| EngineError::Io(format!("staging: {e}")))?;
    }
    writer
        .close()
        .await
        .map_err(|e| EngineError::Io(format!("staging: {e}")))?;
    Ok(rows)
}

/// `bytes_scanned` over every node of an executed plan.
fn scanned_bytes(plan: &dyn ExecutionPlan) -> u64 {
    let own = plan
        .metrics()
        .and_then(|m| m.sum_by_name("bytes_scanned"))
        .map_or(0, |v| v.as_usize() as u64);
    own + plan
        .children()
        .iter()
        .map(|c| scanned_bytes(c.as_ref()))
        .sum::<u64>()
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
