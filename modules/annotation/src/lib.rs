//! The `annotation` module: a labeling platform (N1–N11). See docs/annotation.md.
//!
//! * [`store::queue`] — the next-task claim, locks that lapse by themselves, the append-only
//!   submit; [`store::import`] — streaming, idempotent import; [`store::stats`] — counters.
//! * [`api`] — the REST surface under `/api/annotation/`.
//! * [`cli`] — `bulwark annotation ...`.

pub mod agreement;
pub mod api;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod dvc;
pub mod entity;
pub mod export;
pub mod page;
pub mod store;

use std::sync::Arc;

use axum::routing::{get, post};
use bulwark_kernel::config::{ConfigError, Section, Settings};
use bulwark_kernel::module::{
    Context, Module, ModuleError, ModuleParts, Worker, WorkerKind, status_route,
};
use tokio_util::sync::CancellationToken;

pub use config::AnnotationConfig;

/// What the handlers and workers share.
pub struct AnnotationShared {
    pub cfg: AnnotationConfig,
    pub db: sea_orm::DatabaseConnection,
    /// `export_dir` resolved against `kernel.data_dir`.
    pub export_dir: std::path::PathBuf,
}

/// Metric descriptions (names are the dashboard's and alerts' contract).
fn describe_metrics() {
    use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "bulwark_annotation_claims_total",
        "Next-task answers by outcome (claimed: a new lock; existing: the caller's live lock; empty: 204)."
    );
    describe_histogram!(
        "bulwark_annotation_claim_seconds",
        Unit::Seconds,
        "Time to answer one next-task claim."
    );
    describe_counter!(
        "bulwark_annotation_submits_total",
        "Annotations stored, by kind (new, correction, replay: a retried request answered with its first result)."
    );
    describe_histogram!(
        "bulwark_annotation_submit_seconds",
        Unit::Seconds,
        "Time to store one annotation."
    );
    describe_counter!(
        "bulwark_annotation_conflicts_total",
        "Writes refused with 409, by reason."
    );
    describe_counter!(
        "bulwark_annotation_locks_granted_total",
        "New locks (from a claim or an explicit lock)."
    );
    describe_counter!(
        "bulwark_annotation_lock_expiries_total",
        "Locks that lapsed without a submit or release (removed by the janitor)."
    );
    describe_gauge!(
        "bulwark_annotation_queue_depth",
        "Items of a project still below their wanted annotations."
    );
    describe_counter!(
        "bulwark_annotation_items_imported_total",
        "Items stored by imports."
    );
    describe_counter!(
        "bulwark_annotation_import_errors_total",
        "Import lines refused."
    );
    describe_counter!(
        "bulwark_annotation_exports_total",
        "Export jobs finished, by format and outcome (done, failed)."
    );
    describe_histogram!(
        "bulwark_annotation_export_seconds",
        Unit::Seconds,
        "Time to run one export job, claim to file, by format."
    );
    for format in dataset::Format::ALL {
        for outcome in export::OUTCOMES {
            counter!("bulwark_annotation_exports_total", "format" => format.as_str(), "outcome" => outcome)
                .increment(0);
        }
    }
    // Series exist from the start (at 0): dashboards and alerts see a rate of 0, not "no data".
    for outcome in ["claimed", "existing", "empty"] {
        counter!("bulwark_annotation_claims_total", "outcome" => outcome).increment(0);
    }
    for kind in ["new", "correction", "replay"] {
        counter!("bulwark_annotation_submits_total", "kind" => kind).increment(0);
    }
    for reason in store::ConflictReason::ALL {
        counter!("bulwark_annotation_conflicts_total", "reason" => reason.as_str()).increment(0);
    }
    for name in [
        "bulwark_annotation_locks_granted_total",
        "bulwark_annotation_lock_expiries_total",
        "bulwark_annotation_items_imported_total",
        "bulwark_annotation_import_errors_total",
    ] {
        counter!(name).increment(0);
    }
}

/// Remove lapsed locks (counting them) and refresh the queue gauges, every `janitor_interval`.
/// Correctness never waits for it: a lapsed lock frees its item at `expires_at` by itself.
async fn janitor(s: Arc<AnnotationShared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(s.cfg.janitor_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store::queue::sweep_expired(&s.db, store::now_ms()).await {
            Ok(n) => metrics::counter!("bulwark_annotation_lock_expiries_total").increment(n),
            Err(e) => tracing::warn!(message = "Lock sweep failed.", error = %e),
        }
        match store::stats::queue_depths(&s.db).await {
            Ok(rows) => {
                for (_, name, depth) in rows {
                    #[allow(clippy::cast_precision_loss)]
                    metrics::gauge!("bulwark_annotation_queue_depth", "project" => name)
                        .set(depth as f64);
                }
            }
            Err(e) => tracing::warn!(message = "Queue depth refresh failed.", error = %e),
        }
    }
}

/// The module value the app registers.
pub struct AnnotationModule;

#[async_trait::async_trait]
impl Module for AnnotationModule {
    fn name(&self) -> &'static str {
        "annotation"
    }

    fn check_config(&self, settings: &Settings) -> Result<serde_json::Value, ConfigError> {
        Ok(settings
            .module_section::<AnnotationConfig>(self.name())?
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
            .module_section::<AnnotationConfig>(self.name())?
            .value;
        cli::run(settings, &cfg, args).await
    }

    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        let Section {
            value: cfg,
            effective,
        } = ctx.section::<AnnotationConfig>()?;
        describe_metrics();
        let export_dir = ctx.settings.kernel.data_dir.join(&cfg.export_dir);
        let shared = Arc::new(AnnotationShared {
            cfg,
            db: ctx.db.clone(),
            export_dir,
        });
        let (status, mut openapi) = status_route(self.name(), effective);
        openapi.merge(<api::AnnotationApi as utoipa::OpenApi>::openapi());
        openapi.merge(<page::PageApi as utoipa::OpenApi>::openapi());
        use api::{exports, projects, stats, work};
        let routes = axum::Router::new()
            .route(
                "/api/annotation/projects",
                get(projects::list).post(projects::create),
            )
            .route(
                "/api/annotation/projects/{id}",
                get(projects::get_one).patch(projects::update),
            )
            .route(
                "/api/annotation/projects/{id}/items",
                get(projects::items).post(projects::import),
            )
            .route("/api/annotation/tasks/next", get(work::next))
            .route(
                "/api/annotation/data/{id}",
                get(work::get_item).patch(work::update_item),
            )
            .route(
                "/api/annotation/data/{id}/lock",
                post(work::lock).delete(work::unlock),
            )
            .route(
                "/api/annotation/data/{id}/annotations",
                get(work::item_annotations),
            )
            .route(
                "/api/annotation/annotations",
                get(work::list_annotations).post(work::submit),
            )
            .route(
                "/api/annotation/annotations/{id}/reviews",
                get(work::reviews).post(work::review),
            )
            .route("/api/annotation/stats/progress", get(stats::progress))
            .route(
                "/api/annotation/projects/{id}/agreement",
                get(stats::agreement_report),
            )
            .route("/api/annotation/exports", post(exports::create))
            .route("/api/annotation/exports/{id}", get(exports::get_one))
            .route(
                "/api/annotation/exports/{id}/download",
                get(exports::download),
            )
            .route(page::PATH, get(page::page))
            .with_state(shared.clone())
            .merge(status);
        let workers = vec![
            Worker {
                name: "annotation-janitor".into(),
                kind: WorkerKind::Worker,
                run: Box::pin(janitor(shared.clone(), ctx.shutdown.closing_token())),
            },
            Worker {
                name: "annotation-exports".into(),
                kind: WorkerKind::Worker,
                run: Box::pin(export::worker(shared, ctx.shutdown.closing_token())),
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
