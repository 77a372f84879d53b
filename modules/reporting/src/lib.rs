//! The `reporting` module: analytics kept off the primary (R1–R6).
//!
//! [`capture`] reads a PostgreSQL logical replication slot (pgoutput, decoded by [`pgoutput`])
//! and publishes [`event::Batch`]es on the `CDC` stream (R2, R3); [`sink`] applies them to
//! Delta tables in the pipeline's warehouse (R6); [`summary`] folds those into per-day
//! summaries through the built-in pipeline DAG `reporting_summaries`, and [`api`] serves them
//! through the cache (R4); [`backfill`] reloads a range from a replica (R5, `bulwark reporting
//! backfill`). On a SQLite source (the embedded default) [`trigger`] captures changes through
//! triggers into a change log instead of a slot, behind the same [`capture::ChangeSource`]
//! trait. docs/reporting.md has the design.

pub mod api;
pub mod backfill;
pub mod capture;
pub mod cli;
pub mod config;
pub mod event;
pub mod pgoutput;
pub mod sink;
pub mod stream;
pub mod summary;
pub mod trigger;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bulwark_kernel::bus::{Bus, ConsumerSpec, StreamSpec};
use bulwark_kernel::config::{ConfigError, Settings};
use bulwark_kernel::module::{
    Context, Module, ModuleError, ModuleParts, Worker, WorkerKind, status_route,
};
use bulwark_pipeline::data::Engine;

pub use config::ReportingConfig;

/// The sink's durable consumer.
pub const SINK_CONSUMER: &str = "reporting-sink";

fn describe_metrics() {
    use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
    describe_counter!(
        "bulwark_reporting_changes_captured_total",
        "Row changes read from the replication slot and stored on the CDC stream, by table."
    );
    describe_counter!(
        "bulwark_reporting_snapshot_rows_total",
        "Rows of initial snapshots published, by table."
    );
    describe_counter!(
        "bulwark_reporting_changes_applied_total",
        "Row changes the sink merged into the warehouse, by table."
    );
    describe_counter!(
        "bulwark_reporting_apply_errors_total",
        "Sink batches that failed to apply (redelivered later), by table."
    );
    describe_counter!(
        "bulwark_reporting_capture_errors_total",
        "Slot reads that failed (retried)."
    );
    describe_counter!(
        "bulwark_reporting_truncates_total",
        "TRUNCATEs of captured tables seen in the WAL (not applied; re-snapshot)."
    );
    describe_gauge!(
        "bulwark_reporting_capture_lag_bytes",
        Unit::Bytes,
        "WAL between the primary's current position and the slot's confirmed position."
    );
    describe_gauge!(
        "bulwark_reporting_slot_retained_wal_bytes",
        Unit::Bytes,
        "WAL the slot keeps on the primary (current position minus restart_lsn)."
    );
    describe_gauge!(
        "bulwark_reporting_capture_lag_seconds",
        Unit::Seconds,
        "Age of the newest change at the last slot read (0 when caught up)."
    );
    describe_histogram!(
        "bulwark_reporting_apply_lag_seconds",
        Unit::Seconds,
        "Commit on the source to merged into the warehouse, per applied batch (its newest change)."
    );
    describe_histogram!(
        "bulwark_reporting_capture_read_seconds",
        Unit::Seconds,
        "Time of one read of the slot, its publishes and advance."
    );
    for name in [
        "bulwark_reporting_capture_errors_total",
        "bulwark_reporting_apply_errors_total",
    ] {
        counter!(name).increment(0);
    }
    gauge!("bulwark_reporting_capture_lag_seconds").set(0.0);
}

fn describe_summary_metrics() {
    use metrics::{counter, describe_counter, describe_gauge};
    describe_counter!(
        "bulwark_reporting_warehouse_queries_total",
        "Queries the module ran on the warehouse (Delta), by caller; only the summary task does."
    );
    describe_counter!(
        "bulwark_reporting_report_requests_total",
        "Report API answers, by report and cache outcome (hit, stale, miss, bypass)."
    );
    describe_gauge!(
        "bulwark_reporting_report_refreshed_timestamp_seconds",
        metrics::Unit::Seconds,
        "Unix time of a report's last successful summary refresh."
    );
    describe_gauge!(
        "bulwark_reporting_report_refresh_interval_seconds",
        metrics::Unit::Seconds,
        "The summary DAG's schedule (reporting.summary_interval): staleness is judged against it."
    );
    describe_counter!(
        "bulwark_reporting_backfill_rows_total",
        "Rows a backfill reloaded from the replica, by table."
    );
    describe_counter!(
        "bulwark_reporting_report_days_refreshed_total",
        "Days of a report's summary recomputed."
    );
    counter!("bulwark_reporting_warehouse_queries_total", "caller" => "summary").increment(0);
}

/// The summary DAG: one `reporting_summary` task per report, every `summary_interval`.
pub fn summary_dag(cfg: &ReportingConfig) -> Result<bulwark_pipeline::dag::Dag, String> {
    use bulwark_pipeline::dag::{DagBuilder, Task};
    let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .map_err(|e| e.to_string())?
        .with_timezone(&chrono::Utc);
    let mut b = DagBuilder::new(summary::DAG_ID)
        .description("Per-day summaries of the reporting module's warehouse tables (R4)")
        .schedule(bulwark_pipeline::schedule::Schedule::Interval(
            cfg.summary_interval,
        ))
        .start_date(start)
        .catchup(false)
        .max_active_runs(1)
        .tags(["reporting"])
        .owner("reporting");
    for name in cfg.reports.keys() {
        b = b.task(Task::plugin(
            name.clone(),
            summary::TASK_TYPE,
            serde_json::json!({ "report": name }),
        ));
    }
    b.build().map_err(|e| e.to_string())
}

/// The sink: fetch, group by table, merge, ack.
pub async fn run_sink(
    engine: Engine,
    targets: HashMap<String, String>,
    bus: Arc<dyn Bus>,
    cfg: ReportingConfig,
    stop: tokio_util::sync::CancellationToken,
) {
    let spec = ConsumerSpec {
        stream: event::STREAM.into(),
        durable: SINK_CONSUMER.into(),
        filter_subject: Some(format!("{}.>", event::SUBJECT_PREFIX)),
        ack_wait: cfg.sink_ack_wait,
        max_deliver: 10_000,
        dead_letter_subject: None,
    };
    let consumer = loop {
        match bus.consumer(&spec).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(message = "Cannot bind the reporting sink's consumer; retrying.", error = %e);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    };
    loop {
        let got = tokio::select! {
            () = stop.cancelled() => return,
            r = consumer.fetch(cfg.sink_batch, Duration::from_secs(1)) => r,
        };
        let deliveries = match got {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(message = "Reporting sink fetch failed.", error = %e);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut by_table: Vec<(String, Vec<(bulwark_kernel::bus::Delivery, event::Batch)>)> =
            Vec::new();
        for d in deliveries {
            match serde_json::from_slice::<event::Batch>(&d.payload) {
                Ok(b) => match by_table.iter_mut().find(|(t, _)| *t == b.table) {
                    Some((_, v)) => v.push((d, b)),
                    None => by_table.push((b.table.clone(), vec![(d, b)])),
                },
                Err(e) => {
                    tracing::error!(message = "A CDC message is not a change batch; dropped.", subject = %d.subject, error = %e);
                    metrics::counter!("bulwark_reporting_apply_errors_total", "table" => "unknown")
                        .increment(1);
                    let _ = d.term().await;
                }
            }
        }
        for (table, items) in by_table {
            let target = targets.get(&table).cloned().unwrap_or_else(|| {
                let (s, t) = table.split_once('.').unwrap_or(("public", &table));
                config::target_name(s, t)
            });
            let batches: Vec<event::Batch> = items.iter().map(|(_, b)| b.clone()).collect();
            let newest = batches
                .iter()
                .flat_map(|b| b.changes.iter())
                .filter(|c| c.lsn > 0)
                .map(|c| c.commit_time_us)
                .max();
            match sink::apply(&engine, &target, &batches).await {
                Ok(a) => {
                    tracing::debug!(message = "Applied CDC changes.", table = %table, target = %target, messages = items.len(), changes = a.changes, rows = a.rows, version = ?a.version);
                    for (d, _) in items {
                        if let Err(e) = d.ack().await {
                            tracing::warn!(message = "Ack of an applied CDC message failed (it will be re-applied, harmlessly).", error = %e);
                        }
                    }
                    metrics::counter!("bulwark_reporting_changes_applied_total", "table" => table.clone())
                        .increment(a.changes);
                    if let Some(t) = newest {
                        let lag = chrono::Utc::now().timestamp_micros() - t;
                        metrics::histogram!("bulwark_reporting_apply_lag_seconds")
                            .record(lag.max(0) as f64 / 1e6);
                    }
                }
                Err(e) => {
                    tracing::error!(message = "Applying CDC changes failed; they will be redelivered.", table = %table, error = %e);
                    metrics::counter!("bulwark_reporting_apply_errors_total", "table" => table.clone())
                        .increment(1);
                    for (d, _) in items {
                        let _ = d.nak(Duration::from_secs(5)).await;
                    }
                }
            }
        }
    }
}

/// The `CDC` stream: a subject per table, a day of retention.
pub fn stream_spec(duplicate_window: Duration) -> StreamSpec {
    StreamSpec {
        name: event::STREAM.into(),
        subjects: vec![format!("{}.>", event::SUBJECT_PREFIX)],
        duplicate_window,
        max_age: Some(Duration::from_secs(7 * 24 * 3600)),
    }
}

/// The module value the app registers.
pub struct ReportingModule;

#[async_trait::async_trait]
impl Module for ReportingModule {
    fn name(&self) -> &'static str {
        "reporting"
    }

    fn check_config(&self, settings: &Settings) -> Result<serde_json::Value, ConfigError> {
        Ok(settings
            .module_section::<ReportingConfig>(self.name())?
            .effective)
    }

    fn command(&self) -> Option<clap::Command> {
        Some(cli::command())
    }

    async fn run_command(
        &self,
        settings: &Settings,
        args: &clap::ArgMatches,
    ) -> Result<(), ModuleError> {
        let cfg = settings
            .module_section::<ReportingConfig>(self.name())?
            .value;
        cli::run(settings, &cfg, args).await
    }

    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        let section = ctx.section::<ReportingConfig>()?;
        let (cfg, effective) = (section.value, section.effective);
        let (status, mut openapi) = status_route(self.name(), effective);
        describe_summary_metrics();
        metrics::gauge!("bulwark_reporting_report_refresh_interval_seconds")
            .set(cfg.summary_interval.as_secs_f64());
        let reports = Arc::new(cfg.reports.clone());
        let cache = ctx.service(bulwark_cache::LOADER).ok();
        if cache.is_none() && !reports.is_empty() {
            tracing::warn!(
                message = "The cache module is not running; reports are served from their summaries uncached."
            );
        }
        let pipeline_cfg = ctx
            .settings
            .module_section::<bulwark_pipeline::PipelineConfig>("pipeline")?
            .value;
        let engine = Engine::new(&pipeline_cfg.engine, &ctx.settings.kernel.data_dir);
        // The summary DAG runs where there is something to summarise: capture is on, or a
        // report's table is in the warehouse already (written by another deployment's sink).
        let has_data =
            cfg.source_url.is_some() || reports.values().any(|r| engine.has_table(&r.table));
        if !reports.is_empty() && has_data {
            match ctx.service(bulwark_pipeline::HANDLE) {
                Ok(handle) => {
                    handle.register_task_type(Arc::new(summary::SummaryTask {
                        engine: engine.clone(),
                        db: ctx.db.clone(),
                        reports: reports.clone(),
                        cache: cache.clone(),
                        namespace: cfg.cache_namespace.clone(),
                    }));
                    handle.register_dag(summary_dag(&cfg).map_err(ModuleError::Other)?);
                }
                Err(_) => tracing::warn!(
                    message = "The pipeline module is not running; report summaries are not refreshed (build with the `pipeline` feature)."
                ),
            }
        }
        let state = api::ApiState {
            db: ctx.db.clone(),
            reports,
            cache,
            namespace: cfg.cache_namespace.clone(),
            max_days: cfg.max_report_days,
        };
        let routes = status.merge(
            axum::Router::new()
                .route("/api/reporting/reports", axum::routing::get(api::list))
                .route(
                    "/api/reporting/reports/{name}",
                    axum::routing::get(api::report),
                )
                .with_state(state),
        );
        openapi.merge(<api::ReportingApi as utoipa::OpenApi>::openapi());
        let mut workers = Vec::new();
        if cfg.source_url.is_some() {
            describe_metrics();
            ctx.bus
                .ensure_stream(&stream_spec(ctx.settings.kernel.bus.duplicate_window))
                .await?;
            let targets: HashMap<String, String> = cfg
                .tables
                .iter()
                .map(|t| (t.full_name(), t.target_table()))
                .collect();
            workers.push(Worker {
                name: "reporting-sink".into(),
                kind: WorkerKind::Worker,
                run: Box::pin(run_sink(
                    engine,
                    targets,
                    ctx.bus.clone(),
                    cfg.clone(),
                    ctx.shutdown.closing_token(),
                )),
            });
            if ctx.role.runs(WorkerKind::Scheduler) {
                let url = cfg
                    .source_url
                    .clone()
                    .map(|u| u.expose().to_owned())
                    .unwrap_or_default();
                let source = bulwark_kernel::db::connect_url(&url, &ctx.settings.kernel.database)
                    .await
                    .map_err(|e| ModuleError::Other(format!("reporting.source_url: {e}")))?;
                let stop = ctx.shutdown.closing_token();
                let run: futures::future::BoxFuture<'static, ()> =
                    if sea_orm::ConnectionTrait::get_database_backend(&source)
                        == sea_orm::DbBackend::Sqlite
                    {
                        let capture =
                            trigger::TriggerCapture::prepare(cfg, source, ctx.bus.clone())
                                .await
                                .map_err(|e| ModuleError::Other(e.to_string()))?;
                        Box::pin(capture::run(capture, stop))
                    } else {
                        let mode = cfg.capture_mode;
                        let capture =
                            capture::Capture::prepare(cfg, source, ctx.db.clone(), ctx.bus.clone())
                                .await
                                .map_err(|e| ModuleError::Other(e.to_string()))?;
                        match mode {
                            config::CaptureMode::Poll => Box::pin(capture::run(capture, stop)),
                            config::CaptureMode::Stream => {
                                let capture = stream::StreamCapture::new(capture)
                                    .map_err(|e| ModuleError::Other(e.to_string()))?;
                                Box::pin(capture::run(capture, stop))
                            }
                        }
                    };
                workers.push(Worker {
                    name: "reporting-capture".into(),
                    kind: WorkerKind::Scheduler,
                    run,
                });
            }
        }
        Ok(ModuleParts {
            routes,
            openapi,
            workers,
            ..ModuleParts::default()
        })
    }
}
