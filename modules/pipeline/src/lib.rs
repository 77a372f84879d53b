//! The `pipeline` module: a data-aware orchestrator (P1–P7, P9, P13, P15). See docs/pipeline.md.
//!
//! * [`dag`], [`schedule`], [`template`], [`validate`] — DAG files and the Rust API for
//!   built-in DAGs, schedules and data intervals, argument templates, `pipeline validate`.
//! * [`store`] — every state change in the metadata database.
//! * [`scheduler`] — the lease-holding scheduler; [`worker`] — runs queued tries;
//!   [`exec`] — rendered jobs and the built-in task types.
//! * [`api`] — the REST surface under `/api/pipeline/`; [`cli`] — `bulwark pipeline ...`.
//! * [`registry`] — loaded DAGs, and [`registry::PipelineHandle`] for other modules.
//! * [`data`] — the data engine: `sql` tasks on DataFusion, Delta/Parquet outputs, quality
//!   checks (issue 13).

pub mod api;
pub mod cli;
pub mod config;
pub mod dag;
pub mod data;
pub mod entity;
pub mod exec;
pub mod page;
pub mod registry;
pub mod schedule;
pub mod scheduler;
pub mod store;
pub mod template;
pub mod validate;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use bulwark_kernel::bus::{Bus, StreamSpec};
use bulwark_kernel::config::{ConfigError, Section, Settings};
use bulwark_kernel::module::{
    Context, Module, ModuleError, ModuleParts, Worker, WorkerKind, status_route,
};

pub use config::PipelineConfig;
pub use registry::{HANDLE, PipelineHandle};

/// The work queue of queued tries.
pub const STREAM: &str = "PIPELINE_TASKS";
pub const TASKS_SUBJECT: &str = "pipeline.tasks";
pub const CONSUMER: &str = "pipeline-workers";
/// Ephemeral: "look now" for the scheduler (a task finished, a run was triggered).
pub const WAKE_SUBJECT: &str = "pipeline.wake";

/// What the handlers, the scheduler and the workers share.
pub struct PipelineShared {
    pub cfg: PipelineConfig,
    pub db: sea_orm::DatabaseConnection,
    pub bus: Arc<dyn Bus>,
    pub registry: Arc<registry::Registry>,
    /// Wakes this process's scheduler at once.
    pub wake: tokio::sync::Notify,
    /// Asks [`wake_broadcaster`] to tell the other processes' schedulers.
    pub wake_others: tokio::sync::Notify,
    /// This process's name in leases and task records: host, pid and a random suffix.
    pub instance: String,
}

impl PipelineShared {
    /// Wake the scheduler, here at once and in other processes through the bus (coalesced).
    pub fn wake_scheduler(&self) {
        self.wake.notify_one();
        self.wake_others.notify_one();
    }
}

/// Broadcasts `pipeline.wake` for the other processes' schedulers: at most one per 5 ms
/// however many tasks finish (a `Notify` keeps one pending wake-up, so the last event is never
/// dropped), instead of one per task that a slow subscriber would lose anyway.
async fn wake_broadcaster(s: Arc<PipelineShared>, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = s.wake_others.notified() => {}
        }
        let _ = s
            .bus
            .broadcast(
                WAKE_SUBJECT,
                bulwark_kernel::bus::Headers::new(),
                bytes::Bytes::new(),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn instance_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into());
    let suffix: u32 = rand::random();
    format!("{host}-{}-{suffix:08x}", std::process::id())
}

/// Metric descriptions (names are the dashboard's and alerts' contract, docs/pipeline.md).
fn describe_metrics() {
    use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
    describe_histogram!(
        "bulwark_pipeline_task_start_latency_seconds",
        Unit::Seconds,
        "Time from a try being queued to a worker starting it."
    );
    describe_histogram!(
        "bulwark_pipeline_ready_to_queued_seconds",
        Unit::Seconds,
        "Time from an instance becoming ready (upstreams done, retry delay over) to being queued."
    );
    describe_histogram!(
        "bulwark_pipeline_scheduler_loop_seconds",
        Unit::Seconds,
        "Time of one scheduler pass."
    );
    describe_histogram!(
        "bulwark_pipeline_task_duration_seconds",
        Unit::Seconds,
        "Time from a try starting to its end, by DAG and final state."
    );
    describe_counter!(
        "bulwark_pipeline_tasks_finished_total",
        "Tries finished, by DAG and state (success, failed, up_for_retry, upstream_failed)."
    );
    describe_counter!(
        "bulwark_pipeline_task_retries_total",
        "Tries queued again after a failure."
    );
    describe_counter!(
        "bulwark_pipeline_zombies_total",
        "Running tries failed because their worker stopped heartbeating."
    );
    describe_counter!(
        "bulwark_pipeline_runs_finished_total",
        "Runs finished, by DAG, state and run type."
    );
    describe_gauge!(
        "bulwark_pipeline_runs_past_sla",
        "Unfinished runs whose interval ended more than the DAG's sla ago."
    );
    describe_gauge!(
        "bulwark_pipeline_pool_slots",
        "Slots of each pool, used and open."
    );
    describe_gauge!(
        "bulwark_pipeline_pool_waiting",
        "Ready instances waiting for a slot of the pool."
    );
    describe_gauge!(
        "bulwark_pipeline_queued_tasks",
        "Tries queued and not yet started (the work-queue backlog)."
    );
    describe_gauge!(
        "bulwark_pipeline_deferred_tasks",
        "Sensors waiting for their event (holding no slot)."
    );
    describe_gauge!(
        "bulwark_pipeline_scheduler_active",
        "1 in the process holding the scheduler lease."
    );
    describe_gauge!(
        "bulwark_pipeline_scheduler_heartbeat_timestamp_seconds",
        "Unix time of the active scheduler's last pass."
    );
    describe_gauge!(
        "bulwark_pipeline_dag_import_errors",
        "DAG files that failed to load at the last reload."
    );
    describe_histogram!(
        "bulwark_pipeline_sql_seconds",
        Unit::Seconds,
        "Time of a sql task's query, checks and write."
    );
    describe_counter!(
        "bulwark_pipeline_sql_bytes_scanned_total",
        Unit::Bytes,
        "Bytes the scans of sql tasks read (after projection and predicate pushdown)."
    );
    describe_counter!(
        "bulwark_pipeline_sql_file_bytes_total",
        Unit::Bytes,
        "Bytes of the table files sql tasks read from (the baseline of pushdown)."
    );
    describe_counter!(
        "bulwark_pipeline_checks_total",
        "Quality checks of sql tasks, by DAG, policy, severity and outcome (pass, fail)."
    );
    for name in [
        "bulwark_pipeline_zombies_total",
        "bulwark_pipeline_task_retries_total",
        "bulwark_pipeline_checks_total",
        "bulwark_pipeline_sql_bytes_scanned_total",
        "bulwark_pipeline_sql_file_bytes_total",
    ] {
        counter!(name).increment(0);
    }
    for name in [
        "bulwark_pipeline_queued_tasks",
        "bulwark_pipeline_deferred_tasks",
        "bulwark_pipeline_dag_import_errors",
    ] {
        gauge!(name).set(0.0);
    }
}

/// The module value the app registers.
pub struct PipelineModule;

#[async_trait::async_trait]
impl Module for PipelineModule {
    fn name(&self) -> &'static str {
        "pipeline"
    }

    fn check_config(&self, settings: &Settings) -> Result<serde_json::Value, ConfigError> {
        Ok(settings
            .module_section::<PipelineConfig>(self.name())?
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
            .module_section::<PipelineConfig>(self.name())?
            .value;
        cli::run(settings, &cfg, args).await
    }

    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        let Section {
            value: cfg,
            effective,
        } = ctx.section::<PipelineConfig>()?;
        describe_metrics();
        ctx.bus
            .ensure_stream(&StreamSpec {
                name: STREAM.into(),
                subjects: vec![TASKS_SUBJECT.into()],
                duplicate_window: ctx.settings.kernel.bus.duplicate_window,
                max_age: Some(Duration::from_secs(24 * 3600)),
            })
            .await?;
        let folder = ctx.settings.kernel.data_dir.join(&cfg.dags_folder);
        let registry = Arc::new(registry::Registry::new(folder));
        let handle = Arc::new(PipelineHandle::new(registry.clone()));
        let engine = data::Engine::new(&cfg.engine, &ctx.settings.kernel.data_dir);
        for t in data::task_types(&engine).into_values() {
            handle.register_task_type(t);
        }
        ctx.provide(HANDLE, handle)?;
        let shared = Arc::new(PipelineShared {
            cfg,
            db: ctx.db.clone(),
            bus: ctx.bus.clone(),
            registry,
            wake: tokio::sync::Notify::new(),
            wake_others: tokio::sync::Notify::new(),
            instance: instance_name(),
        });
        // Every role wakes schedulers (web: triggers; worker: finished tasks).
        tokio::spawn(wake_broadcaster(
            shared.clone(),
            ctx.shutdown.closing_token(),
        ));
        let (status, mut openapi) = status_route(self.name(), effective);
        openapi.merge(<api::PipelineApi as utoipa::OpenApi>::openapi());
        openapi.merge(<page::PageApi as utoipa::OpenApi>::openapi());
        let routes = api::routes(shared.clone())
            .route(page::PATH, axum::routing::get(page::page))
            .merge(status);
        let workers = vec![
            Worker {
                name: "pipeline-scheduler".into(),
                kind: WorkerKind::Scheduler,
                run: Box::pin(scheduler::run(shared.clone(), ctx.shutdown.closing_token())),
            },
            Worker {
                name: "pipeline-worker".into(),
                kind: WorkerKind::Worker,
                run: Box::pin(worker::run(shared, ctx.shutdown.closing_token())),
            },
        ];
        Ok(ModuleParts {
            routes,
            openapi,
            workers,
            pages: vec![page::home_entry()],
            ..ModuleParts::default()
        })
    }
}
