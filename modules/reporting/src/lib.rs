//! The `reporting` module: analytics kept off the primary (R1–R6).
//!
//! This slice is change capture (R2, R3) and its columnar store (R6): [`capture`] reads a
//! PostgreSQL logical replication slot (pgoutput, decoded by [`pgoutput`]) and publishes
//! [`event::Batch`]es on the `CDC` stream; [`sink`] applies them to Delta tables in the
//! pipeline's warehouse. docs/reporting.md has the design; summaries, backfill and the
//! embedded (trigger) capture are the next parts.

pub mod capture;
pub mod config;
pub mod event;
pub mod pgoutput;
pub mod sink;

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

    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        let section = ctx.section::<ReportingConfig>()?;
        let (cfg, effective) = (section.value, section.effective);
        let (routes, openapi) = status_route(self.name(), effective);
        let mut workers = Vec::new();
        if cfg.source_url.is_some() {
            describe_metrics();
            ctx.bus
                .ensure_stream(&stream_spec(ctx.settings.kernel.bus.duplicate_window))
                .await?;
            let pipeline = ctx
                .settings
                .module_section::<bulwark_pipeline::PipelineConfig>("pipeline")?
                .value;
            let engine = Engine::new(&pipeline.engine, &ctx.settings.kernel.data_dir);
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
                let capture =
                    capture::Capture::prepare(cfg, source, ctx.db.clone(), ctx.bus.clone())
                        .await
                        .map_err(|e| ModuleError::Other(e.to_string()))?;
                workers.push(Worker {
                    name: "reporting-capture".into(),
                    kind: WorkerKind::Scheduler,
                    run: Box::pin(capture::run(capture, ctx.shutdown.closing_token())),
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
