//! REST surface under `/api/pipeline/`, modelled on Airflow's stable REST API (DAGs, DAG runs,
//! task instances, clear, backfills, logs, pools). Viewers read; admins pause, trigger, clear,
//! backfill and edit pools. Errors are problem+json; lists page by keyset.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use bulwark_kernel::auth::{Auth, require};
use bulwark_kernel::http::{ApiJson, ApiPath, ApiQuery, Bounded, Limit, Text};
use bulwark_kernel::problem::Problem;
use chrono::{DateTime, NaiveDate, TimeZone as _, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::PipelineShared;
use crate::entity::{backfill, dag as dag_e, pool, run, task_instance as ti};
use crate::registry::TaskView;
use crate::schedule::Schedule;
use crate::store::{self, Cleared, NewRun, RunFilter, StoreError, now_ms, run_type, state};

pub type Shared = Arc<PipelineShared>;

pub fn routes(s: Shared) -> axum::Router {
    axum::Router::new()
        .route("/api/pipeline/dags", get(list_dags))
        .route("/api/pipeline/dags/{dag_id}", get(get_dag).patch(patch_dag))
        .route(
            "/api/pipeline/dags/{dag_id}/dagRuns",
            get(list_runs).post(trigger),
        )
        .route("/api/pipeline/dags/{dag_id}/dagRuns/{dag_run_id}", get(get_run))
        .route(
            "/api/pipeline/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances",
            get(list_task_instances),
        )
        .route(
            "/api/pipeline/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}",
            get(get_task_instance),
        )
        .route(
            "/api/pipeline/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}/logs/{try_number}",
            get(get_log),
        )
        .route(
            "/api/pipeline/dags/{dag_id}/clearTaskInstances",
            post(clear_task_instances),
        )
        .route("/api/pipeline/dags/{dag_id}/grid", get(grid))
        .route("/api/pipeline/backfills", get(list_backfills).post(create_backfill))
        .route("/api/pipeline/backfills/{id}", get(get_backfill))
        .route("/api/pipeline/pools", get(list_pools).post(create_pool))
        .route("/api/pipeline/pools/{name}", get(get_pool).patch(patch_pool))
        .route("/api/pipeline/importErrors", get(import_errors))
        .route("/api/pipeline/datasets/{name}/events", post(dataset_event))
        .with_state(s)
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        list_dags, get_dag, patch_dag, list_runs, trigger, get_run, list_task_instances,
        get_task_instance, get_log, clear_task_instances, grid, list_backfills, create_backfill,
        get_backfill, list_pools, create_pool, get_pool, patch_pool, import_errors, dataset_event
    ),
    components(schemas(
        DagView, DagDetail, TaskView, DagRunView, TaskInstanceView, TryView, LogChunk,
        ClearRequest, ClearResult, ClearedView, GridView, GridRun, BackfillRequest, BackfillView,
        BackfillDryRun, PoolView, CreatePool, PatchPool, ImportErrorView, TriggerRequest,
        PatchDag, DatasetEvent, DagList, DagRunList, TaskInstanceList, BackfillList, PoolList,
        ImportErrorList
    )),
    tags((name = "pipeline", description = "DAGs, runs, task instances, backfills and pools (P1–P7)"))
)]
pub struct PipelineApi;

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn problem(e: StoreError) -> Problem {
    match e {
        StoreError::Db(e) => {
            tracing::warn!(message = "Pipeline database error.", error = %e);
            Problem::unavailable("the pipeline store is unavailable")
        }
        StoreError::NotFound(m) => Problem::not_found(m),
        StoreError::Conflict(m) => Problem::conflict(m),
        StoreError::Invalid { field, message } => bad(field, message),
    }
}

fn bad(field: &'static str, message: impl std::fmt::Display) -> Problem {
    Problem::bad_request(format!("{field}: {message}")).extension("field", field.into())
}

// ---------------------------------------------------------------------------------------------
// Views

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DagView {
    pub dag_id: String,
    pub description: String,
    pub file: Option<String>,
    /// Cron text, `every <duration>`, `dataset:<names>` or `none`.
    pub schedule: String,
    pub timezone: String,
    pub is_paused: bool,
    pub owner: String,
    pub tags: Vec<String>,
    pub max_active_runs: i32,
    pub max_active_tasks: i32,
    /// The DAG version's hash (a run records the one it ran with).
    pub hash: String,
    /// The next scheduled interval's start, once the scheduler has looked.
    pub next_logical_date: Option<DateTime<Utc>>,
    pub last_run: Option<DagRunView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DagDetail {
    #[serde(flatten)]
    pub dag: DagView,
    pub start_date: DateTime<Utc>,
    pub end_date: Option<DateTime<Utc>>,
    pub catchup: bool,
    pub tasks: Vec<TaskView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DagRunView {
    pub dag_id: String,
    pub dag_run_id: String,
    pub logical_date: DateTime<Utc>,
    pub data_interval_start: DateTime<Utc>,
    pub data_interval_end: DateTime<Utc>,
    /// scheduled, manual, backfill or dataset.
    pub run_type: String,
    /// queued, running, success or failed.
    pub state: String,
    pub conf: serde_json::Value,
    pub dag_hash: Option<String>,
    pub backfill_id: Option<i64>,
    pub queued_at: DateTime<Utc>,
    pub start_date: Option<DateTime<Utc>>,
    pub end_date: Option<DateTime<Utc>>,
}

fn run_view(r: run::Model) -> DagRunView {
    DagRunView {
        dag_id: r.dag_id,
        dag_run_id: r.run_id,
        logical_date: at(r.logical_date_ms),
        data_interval_start: at(r.interval_start_ms),
        data_interval_end: at(r.interval_end_ms),
        run_type: r.run_type,
        state: r.state,
        conf: serde_json::from_str(&r.conf).unwrap_or(serde_json::Value::Null),
        dag_hash: r.dag_hash,
        backfill_id: r.backfill_id,
        queued_at: at(r.queued_at_ms),
        start_date: r.start_ms.map(at),
        end_date: r.end_ms.map(at),
    }
}

fn dag_view(d: dag_e::Model, last: Option<run::Model>) -> DagView {
    let dataset = d.schedule.starts_with("dataset:");
    DagView {
        dag_id: d.dag_id,
        description: d.description,
        file: d.file,
        schedule: d.schedule,
        timezone: d.timezone,
        is_paused: d.is_paused,
        owner: d.owner,
        tags: serde_json::from_str(&d.tags).unwrap_or_default(),
        max_active_runs: d.max_active_runs,
        max_active_tasks: d.max_active_tasks,
        hash: d.hash,
        // Nothing is scheduled past end_date, so there is no next run to show.
        next_logical_date: d
            .next_logical_ms
            .filter(|n| !dataset && d.end_date_ms.is_none_or(|e| *n <= e))
            .map(at),
        last_run: last.map(run_view),
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskInstanceView {
    pub dag_id: String,
    pub dag_run_id: String,
    pub task_id: String,
    pub logical_date: DateTime<Utc>,
    pub state: String,
    /// The current (or last) try; 0 before the first.
    pub try_number: i32,
    pub max_tries: i32,
    pub task_type: String,
    pub pool: String,
    pub priority_weight: i32,
    pub queued_at: Option<DateTime<Utc>>,
    pub start_date: Option<DateTime<Utc>>,
    pub end_date: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub worker: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The job as rendered for the current try (P6, P13).
    pub rendered: Option<serde_json::Value>,
    /// Every finished try (only in the single-instance answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tries: Option<Vec<TryView>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TryView {
    pub try_number: i32,
    pub state: String,
    pub start_date: Option<DateTime<Utc>>,
    pub end_date: Option<DateTime<Utc>>,
    pub worker: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// What the try reported beyond its log: a `sql` task's bytes scanned and file bytes
    /// (P12), rows written, Delta version and application transaction (P8, P14), and its
    /// quality checks (P10).
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

fn ti_view(t: ti::Model, r: &run::Model) -> TaskInstanceView {
    TaskInstanceView {
        dag_id: t.dag_id,
        dag_run_id: r.run_id.clone(),
        task_id: t.task_id,
        logical_date: at(r.logical_date_ms),
        state: t.state,
        try_number: t.try_number,
        max_tries: t.max_tries,
        task_type: t.task_type,
        pool: t.pool,
        priority_weight: t.priority_weight,
        queued_at: t.queued_at_ms.map(at),
        start_date: t.start_ms.map(at),
        end_date: t.end_ms.map(at),
        duration_ms: t.duration_ms,
        worker: t.worker,
        exit_code: t.exit_code,
        error: t.error,
        next_attempt_at: t.next_attempt_at_ms.map(at),
        rendered: t
            .rendered
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok()),
        tries: None,
    }
}

// ---------------------------------------------------------------------------------------------
// DAGs

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DagQuery {
    /// The previous page's `next_cursor`.
    #[param(inline)]
    pub cursor: Option<Text<250>>,
    #[serde(default)]
    #[param(inline)]
    pub limit: Limit,
    /// Only DAGs with this tag.
    #[param(inline)]
    pub tag: Option<Text<250>>,
    pub paused: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DagList {
    pub dags: Vec<DagView>,
    pub next_cursor: Option<String>,
}

/// List DAGs with their last run (role viewer).
#[utoipa::path(get, path = "/api/pipeline/dags", tag = "pipeline", security(("bearer" = [])),
    params(DagQuery),
    responses((status = 200, description = "A page of DAGs", body = DagList),
              (status = 400, description = "Invalid query"),
              (status = 503, description = "The pipeline store is unavailable")))]
pub async fn list_dags(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiQuery(q): ApiQuery<DagQuery>,
) -> Result<axum::Json<DagList>, Problem> {
    let limit = q.limit.get();
    let mut rows = store::dags(&s.db, q.cursor.as_deref(), limit, q.paused)
        .await
        .map_err(problem)?;
    let full = rows.len() as u64 == limit;
    let next_cursor = full
        .then(|| rows.last().map(|r| r.dag_id.clone()))
        .flatten();
    if let Some(tag) = &q.tag {
        rows.retain(|r| {
            serde_json::from_str::<Vec<String>>(&r.tags)
                .unwrap_or_default()
                .iter()
                .any(|t| t == tag.as_str())
        });
    }
    let ids: Vec<String> = rows.iter().map(|r| r.dag_id.clone()).collect();
    let mut last = store::last_runs(&s.db, &ids).await.map_err(problem)?;
    let dags = rows
        .into_iter()
        .map(|r| {
            let l = last.remove(&r.dag_id);
            dag_view(r, l)
        })
        .collect();
    Ok(axum::Json(DagList { dags, next_cursor }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DagPath {
    pub dag_id: String,
}

async fn active_dag(s: &PipelineShared, dag_id: &str) -> Result<dag_e::Model, Problem> {
    let d = store::dag(&s.db, dag_id).await.map_err(problem)?;
    if !d.is_active {
        return Err(Problem::not_found(format!(
            "DAG `{dag_id}` is not loaded now (its file is gone or broken)"
        )));
    }
    Ok(d)
}

/// One DAG with its tasks (role viewer).
#[utoipa::path(get, path = "/api/pipeline/dags/{dag_id}", tag = "pipeline", security(("bearer" = [])),
    params(DagPath),
    responses((status = 200, description = "The DAG", body = DagDetail),
              (status = 404, description = "No such DAG")))]
pub async fn get_dag(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(DagPath { dag_id }): ApiPath<DagPath>,
) -> Result<axum::Json<DagDetail>, Problem> {
    dag_detail(&s, &dag_id).await.map(axum::Json)
}

async fn dag_detail(s: &PipelineShared, dag_id: &str) -> Result<DagDetail, Problem> {
    let d = active_dag(s, dag_id).await?;
    let mut last = store::last_runs(&s.db, &[dag_id.to_owned()])
        .await
        .map_err(problem)?;
    let tasks: Vec<TaskView> = serde_json::from_str(&d.definition).unwrap_or_default();
    let start_date = at(d.start_date_ms);
    let end_date = d.end_date_ms.map(at);
    let catchup = d.catchup;
    Ok(DagDetail {
        dag: dag_view(d, last.remove(dag_id)),
        start_date,
        end_date,
        catchup,
        tasks,
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchDag {
    /// A paused DAG gets no new scheduled runs and queues no tasks.
    pub is_paused: bool,
}

/// Pause or unpause a DAG (role admin).
#[utoipa::path(patch, path = "/api/pipeline/dags/{dag_id}", tag = "pipeline", security(("bearer" = [])),
    params(DagPath), request_body = PatchDag,
    responses((status = 200, description = "Changed", body = DagDetail),
              (status = 400, description = "Invalid body"),
              (status = 403, description = "Role admin required"),
              (status = 404, description = "No such DAG")))]
pub async fn patch_dag(
    _a: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiPath(DagPath { dag_id }): ApiPath<DagPath>,
    ApiJson(req): ApiJson<PatchDag>,
) -> Result<axum::Json<DagDetail>, Problem> {
    active_dag(&s, &dag_id).await?;
    store::set_paused(&s.db, &dag_id, req.is_paused)
        .await
        .map_err(problem)?;
    s.wake_scheduler();
    dag_detail(&s, &dag_id).await.map(axum::Json)
}

// ---------------------------------------------------------------------------------------------
// Runs

/// A date or an RFC 3339 time. A bare date means midnight in the DAG's timezone.
#[derive(Debug, Clone, Copy)]
pub enum DateArg {
    Date(NaiveDate),
    Time(DateTime<Utc>),
}

impl<'de> Deserialize<'de> for DateArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        if let Ok(t) = DateTime::parse_from_rfc3339(&raw) {
            return Ok(Self::Time(t.with_timezone(&Utc)));
        }
        NaiveDate::parse_from_str(&raw, "%Y-%m-%d")
            .map(Self::Date)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{raw}` is neither a date (YYYY-MM-DD) nor an RFC 3339 time"
                ))
            })
    }
}

impl utoipa::PartialSchema for DateArg {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type,
        };
        let string = |f: KnownFormat| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(f)))
        };
        OneOfBuilder::new()
            .item(string(KnownFormat::Date))
            .item(string(KnownFormat::DateTime))
            .description(Some(
                "A date (YYYY-MM-DD, midnight in the DAG's timezone) or an RFC 3339 time.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for DateArg {}

/// A run id: 1 to 250 of letters, digits and `_.:+-`.
#[derive(Debug, Clone)]
pub struct RunIdText(String);

impl RunIdText {
    fn into_string(self) -> String {
        self.0
    }
    fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for RunIdText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        let ok = (1..=250).contains(&raw.len())
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.:+-".contains(c));
        if ok {
            Ok(Self(raw))
        } else {
            Err(serde::de::Error::custom(
                "a run id is 1 to 250 of letters, digits and _.:+-",
            ))
        }
    }
}

impl utoipa::PartialSchema for RunIdText {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(r"^[A-Za-z0-9_.:+-]{1,250}$"))
            .description(Some("1 to 250 of letters, digits and _.:+-."))
            .into()
    }
}

impl utoipa::ToSchema for RunIdText {}

impl DateArg {
    /// The instant, with a date read in `tz`; `end_of_day` gives a date's last millisecond.
    pub(crate) fn resolve(self, tz: chrono_tz::Tz, end_of_day: bool) -> DateTime<Utc> {
        match self {
            Self::Time(t) => t,
            Self::Date(d) => {
                let day = if end_of_day {
                    d.succ_opt().unwrap_or(d)
                } else {
                    d
                };
                let local = day.and_hms_opt(0, 0, 0).unwrap_or_default();
                let t = tz
                    .from_local_datetime(&local)
                    .earliest()
                    .map(|t| t.with_timezone(&Utc))
                    .unwrap_or_else(|| Utc.from_utc_datetime(&local));
                if end_of_day {
                    t - chrono::Duration::milliseconds(1)
                } else {
                    t
                }
            }
        }
    }
}

fn tz_of(d: &dag_e::Model) -> chrono_tz::Tz {
    d.timezone.parse().unwrap_or(chrono_tz::UTC)
}

fn schedule_of(d: &dag_e::Model) -> Schedule {
    Schedule::parse(&d.schedule).unwrap_or(Schedule::None)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerRequest {
    /// Default: now. A schedule point gets that interval; any other time an empty interval.
    #[schema(inline)]
    pub logical_date: Option<DateArg>,
    /// Free-form settings for this run, as `{{ conf.x }}` in templates.
    pub conf: Option<serde_json::Map<String, serde_json::Value>>,
    /// Default: `manual__<logical date>`.
    #[schema(inline)]
    pub dag_run_id: Option<RunIdText>,
}

/// Trigger a run (role admin).
#[utoipa::path(post, path = "/api/pipeline/dags/{dag_id}/dagRuns", tag = "pipeline", security(("bearer" = [])),
    params(DagPath), request_body = TriggerRequest,
    responses((status = 201, description = "Queued", body = DagRunView),
              (status = 400, description = "Invalid field (named in `field`)"),
              (status = 403, description = "Role admin required"),
              (status = 404, description = "No such DAG"),
              (status = 409, description = "That logical date or run id has a run")))]
pub async fn trigger(
    _a: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiPath(DagPath { dag_id }): ApiPath<DagPath>,
    ApiJson(req): ApiJson<TriggerRequest>,
) -> Result<(StatusCode, axum::Json<DagRunView>), Problem> {
    let d = active_dag(&s, &dag_id).await?;
    let tz = tz_of(&d);
    let logical = req
        .logical_date
        .map_or_else(Utc::now, |l| l.resolve(tz, false));
    let iv = schedule_of(&d).interval_at(at(d.start_date_ms), tz, logical);
    let run_id = match req.dag_run_id {
        Some(r) => r.into_string(),
        None => crate::scheduler::run_id_for(run_type::MANUAL, logical),
    };
    let new = NewRun {
        dag_id: dag_id.clone(),
        run_id,
        logical_date_ms: logical.timestamp_millis(),
        interval_start_ms: iv.start.timestamp_millis(),
        interval_end_ms: iv.end.timestamp_millis(),
        run_type: run_type::MANUAL,
        conf: serde_json::Value::Object(req.conf.unwrap_or_default()),
        backfill_id: None,
    };
    let r = store::create_run(&s.db, new, now_ms())
        .await
        .map_err(problem)?;
    s.wake_scheduler();
    Ok((StatusCode::CREATED, axum::Json(run_view(r))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunQuery {
    /// The previous page's `next_cursor` (newest first).
    pub cursor: Option<DateTime<Utc>>,
    #[serde(default)]
    #[param(inline)]
    pub limit: Limit,
    /// queued, running, success or failed.
    #[param(inline)]
    pub state: Option<RunStateParam>,
    #[param(inline)]
    pub run_type: Option<RunTypeParam>,
    pub logical_date_gte: Option<DateTime<Utc>>,
    pub logical_date_lte: Option<DateTime<Utc>>,
    pub backfill_id: Option<i64>,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStateParam {
    Queued,
    Running,
    Success,
    Failed,
}

impl RunStateParam {
    fn as_str(self) -> &'static str {
        match self {
            Self::Queued => state::QUEUED,
            Self::Running => state::RUNNING,
            Self::Success => state::SUCCESS,
            Self::Failed => state::FAILED,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunTypeParam {
    Scheduled,
    Manual,
    Backfill,
    Dataset,
}

impl RunTypeParam {
    fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => run_type::SCHEDULED,
            Self::Manual => run_type::MANUAL,
            Self::Backfill => run_type::BACKFILL,
            Self::Dataset => run_type::DATASET,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DagRunList {
    pub dag_runs: Vec<DagRunView>,
    pub next_cursor: Option<DateTime<Utc>>,
}

/// List a DAG's runs, newest logical date first (role viewer).
#[utoipa::path(get, path = "/api/pipeline/dags/{dag_id}/dagRuns", tag = "pipeline", security(("bearer" = [])),
    params(DagPath, RunQuery),
    responses((status = 200, description = "A page of runs", body = DagRunList),
              (status = 400, description = "Invalid query"),
              (status = 404, description = "No such DAG")))]
pub async fn list_runs(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(DagPath { dag_id }): ApiPath<DagPath>,
    ApiQuery(q): ApiQuery<RunQuery>,
) -> Result<axum::Json<DagRunList>, Problem> {
    store::dag(&s.db, &dag_id).await.map_err(problem)?;
    let limit = q.limit.get();
    let f = RunFilter {
        state: q.state.map(|s| s.as_str().to_owned()),
        run_type: q.run_type.map(|s| s.as_str().to_owned()),
        logical_gte: q.logical_date_gte.map(|t| t.timestamp_millis()),
        logical_lte: q.logical_date_lte.map(|t| t.timestamp_millis()),
        before_logical: q.cursor.map(|t| t.timestamp_millis()),
        backfill_id: q.backfill_id,
    };
    let rows = store::runs(&s.db, &dag_id, &f, limit)
        .await
        .map_err(problem)?;
    let next_cursor = (rows.len() as u64 == limit)
        .then(|| rows.last().map(|r| at(r.logical_date_ms)))
        .flatten();
    Ok(axum::Json(DagRunList {
        dag_runs: rows.into_iter().map(run_view).collect(),
        next_cursor,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RunPath {
    pub dag_id: String,
    pub dag_run_id: String,
}

/// One run (role viewer).
#[utoipa::path(get, path = "/api/pipeline/dags/{dag_id}/dagRuns/{dag_run_id}", tag = "pipeline", security(("bearer" = [])),
    params(RunPath),
    responses((status = 200, description = "The run", body = DagRunView),
              (status = 404, description = "No such DAG or run")))]
pub async fn get_run(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(p): ApiPath<RunPath>,
) -> Result<axum::Json<DagRunView>, Problem> {
    let r = store::run_by_id(&s.db, &p.dag_id, &p.dag_run_id)
        .await
        .map_err(problem)?;
    Ok(axum::Json(run_view(r)))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskInstanceList {
    pub task_instances: Vec<TaskInstanceView>,
}

/// A run's task instances (role viewer).
#[utoipa::path(get, path = "/api/pipeline/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances", tag = "pipeline", security(("bearer" = [])),
    params(RunPath),
    responses((status = 200, description = "The instances", body = TaskInstanceList),
              (status = 404, description = "No such DAG or run")))]
pub async fn list_task_instances(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(p): ApiPath<RunPath>,
) -> Result<axum::Json<TaskInstanceList>, Problem> {
    let r = store::run_by_id(&s.db, &p.dag_id, &p.dag_run_id)
        .await
        .map_err(problem)?;
    let rows = store::task_instances(&s.db, r.id).await.map_err(problem)?;
    Ok(axum::Json(TaskInstanceList {
        task_instances: rows.into_iter().map(|t| ti_view(t, &r)).collect(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TaskPath {
    pub dag_id: String,
    pub dag_run_id: String,
    pub task_id: String,
}

/// One task instance with its tries (role viewer).
#[utoipa::path(get, path = "/api/pipeline/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}", tag = "pipeline", security(("bearer" = [])),
    params(TaskPath),
    responses((status = 200, description = "The instance", body = TaskInstanceView),
              (status = 404, description = "No such DAG, run or task")))]
pub async fn get_task_instance(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(p): ApiPath<TaskPath>,
) -> Result<axum::Json<TaskInstanceView>, Problem> {
    let r = store::run_by_id(&s.db, &p.dag_id, &p.dag_run_id)
        .await
        .map_err(problem)?;
    let t = store::task_instance_of(&s.db, r.id, &p.task_id)
        .await
        .map_err(problem)?;
    let tries = store::tries(&s.db, t.id).await.map_err(problem)?;
    let mut v = ti_view(t, &r);
    v.tries = Some(
        tries
            .into_iter()
            .map(|y| TryView {
                try_number: y.try_number,
                state: y.state,
                start_date: y.start_ms.map(at),
                end_date: y.end_ms.map(at),
                worker: y.worker,
                exit_code: y.exit_code,
                error: y.error,
                details: y
                    .details
                    .as_deref()
                    .and_then(|d| serde_json::from_str(d).ok()),
            })
            .collect(),
    );
    Ok(axum::Json(v))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct LogPath {
    pub dag_id: String,
    pub dag_run_id: String,
    pub task_id: String,
    #[param(inline)]
    pub try_number: Bounded<1, 100_000>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// The previous answer's `next_offset` (0: from the start).
    #[param(inline)]
    pub offset: Option<Bounded<0, { i64::MAX }>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogChunk {
    pub content: String,
    /// Ask again with this offset for what follows.
    pub next_offset: i64,
    /// The try has finished: nothing will follow.
    pub complete: bool,
}

/// A try's log, from `offset` (role viewer). Poll with `next_offset` while the try runs.
#[utoipa::path(get, path = "/api/pipeline/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}/logs/{try_number}", tag = "pipeline", security(("bearer" = [])),
    params(LogPath, LogQuery),
    responses((status = 200, description = "Log text", body = LogChunk),
              (status = 400, description = "Invalid try number or offset"),
              (status = 404, description = "No such DAG, run, task or try")))]
pub async fn get_log(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(p): ApiPath<LogPath>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<axum::Json<LogChunk>, Problem> {
    let r = store::run_by_id(&s.db, &p.dag_id, &p.dag_run_id)
        .await
        .map_err(problem)?;
    let t = store::task_instance_of(&s.db, r.id, &p.task_id)
        .await
        .map_err(problem)?;
    let try_number = i32::try_from(p.try_number.get()).unwrap_or(i32::MAX);
    if try_number > t.try_number {
        return Err(Problem::not_found(format!(
            "task `{}` has had {} tries",
            p.task_id, t.try_number
        )));
    }
    let offset = q.offset.map_or(0, Bounded::get);
    let (content, next_offset) = store::read_log(&s.db, t.id, try_number, offset)
        .await
        .map_err(problem)?;
    let running = try_number == t.try_number
        && matches!(
            t.state.as_str(),
            state::RUNNING | state::QUEUED | state::DEFERRED
        );
    Ok(axum::Json(LogChunk {
        complete: !running && next_offset == offset,
        content,
        next_offset,
    }))
}

// ---------------------------------------------------------------------------------------------
// Clear (P3, P7)

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClearRequest {
    /// Only list what would be cleared (the default, as in Airflow).
    #[serde(default = "yes")]
    pub dry_run: bool,
    #[schema(inline)]
    pub start_date: Option<DateArg>,
    #[schema(inline)]
    pub end_date: Option<DateArg>,
    #[schema(inline)]
    pub dag_run_id: Option<RunIdText>,
    /// Task ids; with `task_regex` the union. Neither: every task.
    #[schema(inline)]
    pub task_ids: Option<Vec<Text<250>>>,
    /// A regular expression a task id must match (anywhere; anchor it with ^...$).
    #[schema(inline)]
    pub task_regex: Option<Text<1000>>,
    #[serde(default)]
    pub include_downstream: bool,
    #[serde(default)]
    pub include_upstream: bool,
    #[serde(default)]
    pub only_failed: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClearedView {
    pub dag_run_id: String,
    pub task_id: String,
    pub logical_date: DateTime<Utc>,
    /// The state before the clear.
    pub state: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClearResult {
    pub dry_run: bool,
    pub task_instances: Vec<ClearedView>,
}

/// Transitive closure over the stored definition (`downstream` or `depends_on` edges).
fn closure(tasks: &[TaskView], start: &HashSet<String>, down: bool) -> HashSet<String> {
    let by: HashMap<&str, &TaskView> = tasks.iter().map(|t| (t.task_id.as_str(), t)).collect();
    let mut out = start.clone();
    let mut stack: Vec<String> = start.iter().cloned().collect();
    while let Some(t) = stack.pop() {
        if let Some(v) = by.get(t.as_str()) {
            let next = if down { &v.downstream } else { &v.depends_on };
            for n in next {
                if out.insert(n.clone()) {
                    stack.push(n.clone());
                }
            }
        }
    }
    out
}

/// Clear task instances so they run again (role admin): by date range, run, task ids or a
/// regex, with their downstream and/or upstream, or only the failed ones. `dry_run` (the
/// default) lists exactly what would be reset.
#[utoipa::path(post, path = "/api/pipeline/dags/{dag_id}/clearTaskInstances", tag = "pipeline", security(("bearer" = [])),
    params(DagPath), request_body = ClearRequest,
    responses((status = 200, description = "What was (or would be) cleared", body = ClearResult),
              (status = 400, description = "Invalid field, or a selection that matches nothing"),
              (status = 403, description = "Role admin required"),
              (status = 404, description = "No such DAG")))]
pub async fn clear_task_instances(
    _a: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiPath(DagPath { dag_id }): ApiPath<DagPath>,
    ApiJson(req): ApiJson<ClearRequest>,
) -> Result<axum::Json<ClearResult>, Problem> {
    let d = active_dag(&s, &dag_id).await?;
    let tz = tz_of(&d);
    let tasks: Vec<TaskView> = serde_json::from_str(&d.definition).unwrap_or_default();
    let mut chosen: HashSet<String> = HashSet::new();
    let named = req.task_ids.is_some() || req.task_regex.is_some();
    if let Some(ids) = &req.task_ids {
        for id in ids {
            if !tasks.iter().any(|t| t.task_id == id.as_str()) {
                return Err(bad(
                    "task_ids",
                    format!("DAG `{dag_id}` has no task `{}`", id.as_str()),
                ));
            }
            chosen.insert(id.as_str().to_owned());
        }
    }
    if let Some(re) = &req.task_regex {
        let re = regex::Regex::new(re.as_str()).map_err(|e| bad("task_regex", e))?;
        chosen.extend(
            tasks
                .iter()
                .filter(|t| re.is_match(&t.task_id))
                .map(|t| t.task_id.clone()),
        );
    }
    if !named {
        chosen.extend(tasks.iter().map(|t| t.task_id.clone()));
    }
    if chosen.is_empty() {
        return Err(bad(
            "task_ids",
            "the selection names no task of the DAG (an empty list, or a regex that matches none)",
        ));
    }
    let mut all = chosen.clone();
    if req.include_downstream {
        all.extend(closure(&tasks, &chosen, true));
    }
    if req.include_upstream {
        all.extend(closure(&tasks, &chosen, false));
    }
    let from = req
        .start_date
        .map(|d| d.resolve(tz, false).timestamp_millis());
    let to = req.end_date.map(|d| d.resolve(tz, true).timestamp_millis());
    if let (Some(f), Some(t)) = (from, to)
        && t < f
    {
        return Err(bad("end_date", "is before start_date"));
    }
    let mut list: Vec<String> = all.into_iter().collect();
    list.sort();
    let selected = store::clear_candidates(
        &s.db,
        &dag_id,
        from,
        to,
        req.dag_run_id.as_ref().map(RunIdText::as_str),
        &list,
        req.only_failed,
    )
    .await
    .map_err(problem)?;
    if !req.dry_run {
        if selected.is_empty() {
            return Err(bad(
                "task_ids",
                "nothing to clear: the selection matches no task instance",
            ));
        }
        let retries: HashMap<String, i32> = tasks
            .iter()
            .map(|t| (t.task_id.clone(), i32::try_from(t.retries).unwrap_or(0)))
            .collect();
        store::clear(&s.db, &selected, &retries)
            .await
            .map_err(problem)?;
        s.wake_scheduler();
    }
    Ok(axum::Json(ClearResult {
        dry_run: req.dry_run,
        task_instances: selected.into_iter().map(cleared_view).collect(),
    }))
}

fn cleared_view(c: Cleared) -> ClearedView {
    ClearedView {
        dag_run_id: c.dag_run_id,
        task_id: c.task_id,
        logical_date: at(c.logical_date_ms),
        state: c.state,
    }
}

// ---------------------------------------------------------------------------------------------
// Grid

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct GridQuery {
    /// How many of the latest runs.
    #[serde(default)]
    #[param(inline)]
    pub limit: Limit,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GridRun {
    pub dag_run_id: String,
    pub logical_date: DateTime<Utc>,
    pub run_type: String,
    pub state: String,
    pub start_date: Option<DateTime<Utc>>,
    pub end_date: Option<DateTime<Utc>>,
    /// Task id → state (absent: the run has not created it yet).
    pub cells: HashMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GridView {
    pub tasks: Vec<String>,
    /// Oldest first (the grid reads left to right).
    pub runs: Vec<GridRun>,
}

/// Runs × tasks coloured by state, for the UI's grid (role viewer).
#[utoipa::path(get, path = "/api/pipeline/dags/{dag_id}/grid", tag = "pipeline", security(("bearer" = [])),
    params(DagPath, GridQuery),
    responses((status = 200, description = "The grid", body = GridView),
              (status = 400, description = "Invalid query"),
              (status = 404, description = "No such DAG")))]
pub async fn grid(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(DagPath { dag_id }): ApiPath<DagPath>,
    ApiQuery(q): ApiQuery<GridQuery>,
) -> Result<axum::Json<GridView>, Problem> {
    let d = store::dag(&s.db, &dag_id).await.map_err(problem)?;
    let tasks: Vec<TaskView> = serde_json::from_str(&d.definition).unwrap_or_default();
    let mut runs = store::runs(&s.db, &dag_id, &RunFilter::default(), q.limit.get())
        .await
        .map_err(problem)?;
    runs.reverse();
    let pks: Vec<i64> = runs.iter().map(|r| r.id).collect();
    let cells = store::states_of_runs(&s.db, &pks).await.map_err(problem)?;
    Ok(axum::Json(GridView {
        tasks: tasks.into_iter().map(|t| t.task_id).collect(),
        runs: runs
            .into_iter()
            .map(|r| GridRun {
                cells: cells.get(&r.id).cloned().unwrap_or_default(),
                dag_run_id: r.run_id,
                logical_date: at(r.logical_date_ms),
                run_type: r.run_type,
                state: r.state,
                start_date: r.start_ms.map(at),
                end_date: r.end_ms.map(at),
            })
            .collect(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Backfills (P7, P15)

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Reprocess {
    /// Skip logical dates that already have a run.
    #[default]
    None,
    /// Rerun dates whose run failed; skip the others.
    Failed,
    /// Rerun every date, also those that succeeded.
    All,
}

impl Reprocess {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Failed => "failed",
            Self::All => "all",
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackfillRequest {
    #[schema(inline)]
    pub dag_id: Text<250>,
    /// First logical date (inclusive). A bare date is midnight in the DAG's timezone.
    #[schema(inline)]
    pub from_date: DateArg,
    /// Last logical date (inclusive; a bare date covers the whole day).
    #[schema(inline)]
    pub to_date: DateArg,
    #[serde(default)]
    pub reprocess_behavior: Reprocess,
    /// Runs of this backfill active at once (default: the DAG's max_active_runs).
    #[schema(inline)]
    pub max_active_runs: Option<Bounded<1, 10_000>>,
    #[serde(default)]
    pub dry_run: bool,
    /// Allow more runs than `pipeline.max_backfill_runs` (P15: no unbounded backfill by accident).
    #[serde(default)]
    pub allow_large: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackfillView {
    pub id: i64,
    pub dag_id: String,
    pub from_date: DateTime<Utc>,
    pub to_date: DateTime<Utc>,
    pub reprocess_behavior: String,
    pub max_active_runs: i32,
    /// running or done.
    pub state: String,
    pub total_runs: i32,
    pub finished_runs: i64,
    pub failed_runs: i64,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackfillDryRun {
    pub dry_run: bool,
    /// The logical dates the backfill would run (new runs and reprocessed ones).
    pub logical_dates: Vec<DateTime<Utc>>,
    /// Dates skipped because they have a run and `reprocess_behavior` leaves it.
    pub skipped: Vec<DateTime<Utc>>,
}

async fn backfill_view(s: &PipelineShared, b: backfill::Model) -> Result<BackfillView, Problem> {
    let (done, bad_runs) = store::backfill_progress(&s.db, b.id)
        .await
        .map_err(problem)?;
    Ok(BackfillView {
        id: b.id,
        dag_id: b.dag_id,
        from_date: at(b.from_ms),
        to_date: at(b.to_ms),
        reprocess_behavior: b.reprocess,
        max_active_runs: b.max_active_runs,
        state: b.state,
        total_runs: b.total_runs,
        finished_runs: done,
        failed_runs: bad_runs,
        created_at: at(b.created_at_ms),
        created_by: b.created_by,
    })
}

/// What a backfill request resolves to: the plan (dates to create, runs to rerun, skipped).
pub struct BackfillPlan {
    pub dag: dag_e::Model,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub new_runs: Vec<NewRun>,
    pub rerun_runs: Vec<i64>,
    pub rerun_dates: Vec<DateTime<Utc>>,
    pub skipped: Vec<DateTime<Utc>>,
}

/// Resolve and check a backfill (shared by the API and `bulwark pipeline backfill`).
pub async fn plan_backfill(
    db: &sea_orm::DatabaseConnection,
    max_backfill_runs: usize,
    dag_id: &str,
    from: DateArg,
    to: DateArg,
    reprocess: Reprocess,
    allow_large: bool,
) -> Result<BackfillPlan, StoreError> {
    let d = store::dag(db, dag_id).await?;
    if !d.is_active {
        return Err(StoreError::NotFound(format!(
            "DAG `{dag_id}` is not loaded now (its file is gone or broken)"
        )));
    }
    let tz = tz_of(&d);
    let from = from.resolve(tz, false);
    let to = to.resolve(tz, true);
    if to < from {
        return Err(StoreError::invalid(
            "to_date",
            "is before from_date (the range is reversed)",
        ));
    }
    let sched = schedule_of(&d);
    if matches!(sched, Schedule::None | Schedule::Dataset(_)) {
        return Err(StoreError::invalid(
            "dag_id",
            format!("DAG `{dag_id}` has no time schedule, so it has no dates to backfill"),
        ));
    }
    let max = max_backfill_runs;
    // Even with allow_large a backfill is bounded (a typo must not create millions of runs).
    let limit = if allow_large { 100_000 } else { max };
    let intervals = sched.intervals_between(at(d.start_date_ms), tz, from, to, limit);
    if intervals.len() > limit {
        return Err(if allow_large {
            StoreError::invalid("to_date", "the range has more than 100,000 runs")
        } else {
            StoreError::invalid(
                "allow_large",
                format!(
                    "the range has more than pipeline.max_backfill_runs = {max} runs; \
                     narrow it or set allow_large"
                ),
            )
        });
    }
    if intervals.is_empty() {
        return Err(StoreError::invalid(
            "from_date",
            "the range holds no schedule point of the DAG",
        ));
    }
    let existing =
        store::existing_runs(db, dag_id, from.timestamp_millis(), to.timestamp_millis()).await?;
    let mut plan = BackfillPlan {
        dag: d,
        from,
        to,
        new_runs: Vec::new(),
        rerun_runs: Vec::new(),
        rerun_dates: Vec::new(),
        skipped: Vec::new(),
    };
    for iv in intervals {
        let ms = iv.start.timestamp_millis();
        match existing.get(&ms) {
            None => plan.new_runs.push(NewRun {
                dag_id: dag_id.to_owned(),
                run_id: crate::scheduler::run_id_for(run_type::BACKFILL, iv.start),
                logical_date_ms: ms,
                interval_start_ms: ms,
                interval_end_ms: iv.end.timestamp_millis(),
                run_type: run_type::BACKFILL,
                conf: serde_json::json!({}),
                backfill_id: None,
            }),
            Some((pk, st)) => {
                let finished = st == state::SUCCESS || st == state::FAILED;
                let rerun = finished
                    && match reprocess {
                        Reprocess::None => false,
                        Reprocess::Failed => st == state::FAILED,
                        Reprocess::All => true,
                    };
                if rerun {
                    plan.rerun_runs.push(*pk);
                    plan.rerun_dates.push(iv.start);
                } else {
                    plan.skipped.push(iv.start);
                }
            }
        }
    }
    Ok(plan)
}

/// Store a planned backfill (the scheduler starts its runs).
pub async fn start_backfill(
    db: &sea_orm::DatabaseConnection,
    plan: BackfillPlan,
    reprocess: Reprocess,
    max_active_runs: Option<i32>,
    by: &str,
) -> Result<backfill::Model, StoreError> {
    let tasks: Vec<TaskView> = serde_json::from_str(&plan.dag.definition).unwrap_or_default();
    let retries: HashMap<String, i32> = tasks
        .iter()
        .map(|t| (t.task_id.clone(), i32::try_from(t.retries).unwrap_or(0)))
        .collect();
    let rerun = store::instances_of_runs(db, &plan.rerun_runs).await?;
    let total = plan.new_runs.len() + plan.rerun_runs.len();
    let b = backfill::Model {
        id: 0,
        dag_id: plan.dag.dag_id.clone(),
        from_ms: plan.from.timestamp_millis(),
        to_ms: plan.to.timestamp_millis(),
        reprocess: reprocess.as_str().to_owned(),
        max_active_runs: max_active_runs.unwrap_or(plan.dag.max_active_runs),
        state: "running".into(),
        total_runs: i32::try_from(total).unwrap_or(i32::MAX),
        created_at_ms: now_ms(),
        created_by: by.to_owned(),
    };
    store::create_backfill(db, b, plan.new_runs, &rerun, &retries, now_ms()).await
}

/// Create a backfill (role admin): one run per schedule point in the range, at most
/// `max_active_runs` at once. `dry_run` lists the dates.
#[utoipa::path(post, path = "/api/pipeline/backfills", tag = "pipeline", security(("bearer" = [])),
    request_body = BackfillRequest,
    responses((status = 201, description = "Created", body = BackfillView),
              (status = 200, description = "Dry run: the dates", body = BackfillDryRun),
              (status = 400, description = "Invalid field: a reversed range, a range over the maximum, no schedule"),
              (status = 403, description = "Role admin required"),
              (status = 404, description = "No such DAG")))]
pub async fn create_backfill(
    a: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiJson(req): ApiJson<BackfillRequest>,
) -> Result<axum::response::Response, Problem> {
    use axum::response::IntoResponse;
    let plan = plan_backfill(
        &s.db,
        s.cfg.max_backfill_runs,
        req.dag_id.as_str(),
        req.from_date,
        req.to_date,
        req.reprocess_behavior,
        req.allow_large,
    )
    .await
    .map_err(problem)?;
    if req.dry_run {
        let mut dates: Vec<DateTime<Utc>> = plan
            .new_runs
            .iter()
            .map(|r| at(r.logical_date_ms))
            .chain(plan.rerun_dates.iter().copied())
            .collect();
        dates.sort();
        return Ok(axum::Json(BackfillDryRun {
            dry_run: true,
            logical_dates: dates,
            skipped: plan.skipped,
        })
        .into_response());
    }
    if plan.new_runs.is_empty() && plan.rerun_runs.is_empty() {
        return Err(bad(
            "reprocess_behavior",
            "every date in the range has a run already; choose reprocess_behavior failed or all",
        ));
    }
    let max = req
        .max_active_runs
        .map(|m| i32::try_from(m.get()).unwrap_or(i32::MAX));
    let b = start_backfill(&s.db, plan, req.reprocess_behavior, max, &a.0.subject)
        .await
        .map_err(problem)?;
    s.wake_scheduler();
    let v = backfill_view(&s, b).await?;
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BackfillQuery {
    #[param(inline)]
    pub dag_id: Option<Text<250>>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<i64>,
    #[serde(default)]
    #[param(inline)]
    pub limit: Limit,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BackfillList {
    pub backfills: Vec<BackfillView>,
    pub next_cursor: Option<i64>,
}

/// List backfills, newest first (role viewer).
#[utoipa::path(get, path = "/api/pipeline/backfills", tag = "pipeline", security(("bearer" = [])),
    params(BackfillQuery),
    responses((status = 200, description = "A page of backfills", body = BackfillList),
              (status = 400, description = "Invalid query")))]
pub async fn list_backfills(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiQuery(q): ApiQuery<BackfillQuery>,
) -> Result<axum::Json<BackfillList>, Problem> {
    let limit = q.limit.get();
    let rows = store::backfills(&s.db, q.dag_id.as_deref(), q.cursor, limit)
        .await
        .map_err(problem)?;
    let next_cursor = (rows.len() as u64 == limit)
        .then(|| rows.last().map(|b| b.id))
        .flatten();
    let mut out = Vec::with_capacity(rows.len());
    for b in rows {
        out.push(backfill_view(&s, b).await?);
    }
    Ok(axum::Json(BackfillList {
        backfills: out,
        next_cursor,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct IdPath {
    pub id: i64,
}

/// One backfill with its progress (role viewer).
#[utoipa::path(get, path = "/api/pipeline/backfills/{id}", tag = "pipeline", security(("bearer" = [])),
    params(IdPath),
    responses((status = 200, description = "The backfill", body = BackfillView),
              (status = 404, description = "No such backfill")))]
pub async fn get_backfill(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(IdPath { id }): ApiPath<IdPath>,
) -> Result<axum::Json<BackfillView>, Problem> {
    let b = store::backfill_by_id(&s.db, id).await.map_err(problem)?;
    Ok(axum::Json(backfill_view(&s, b).await?))
}

// ---------------------------------------------------------------------------------------------
// Pools (P5)

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolView {
    pub name: String,
    pub slots: i32,
    /// Instances running in the pool.
    pub running: i64,
    /// Queued, waiting for a worker (they hold a slot).
    pub queued: i64,
    /// Sensors of the pool waiting for their event (they hold no slot).
    pub deferred: i64,
    pub open: i64,
    pub description: String,
}

async fn pool_views(s: &PipelineShared, only: Option<&str>) -> Result<Vec<PoolView>, Problem> {
    let counts = store::pool_counts(&s.db).await.map_err(problem)?;
    let pools = match only {
        Some(n) => vec![store::pool_by_name(&s.db, n).await.map_err(problem)?],
        None => store::pools(&s.db).await.map_err(problem)?,
    };
    Ok(pools
        .into_iter()
        .map(|p: pool::Model| {
            let c = counts.get(&p.name).cloned().unwrap_or_default();
            let get = |k: &str| c.get(k).copied().unwrap_or(0);
            let (running, queued, deferred) = (
                get(state::RUNNING),
                get(state::QUEUED),
                get(state::DEFERRED),
            );
            PoolView {
                open: (i64::from(p.slots) - running - queued).max(0),
                name: p.name,
                slots: p.slots,
                running,
                queued,
                deferred,
                description: p.description,
            }
        })
        .collect())
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolList {
    pub pools: Vec<PoolView>,
}

/// Pools with their slots in use (role viewer).
#[utoipa::path(get, path = "/api/pipeline/pools", tag = "pipeline", security(("bearer" = [])),
    responses((status = 200, description = "The pools", body = PoolList)))]
pub async fn list_pools(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
) -> Result<axum::Json<PoolList>, Problem> {
    Ok(axum::Json(PoolList {
        pools: pool_views(&s, None).await?,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct PoolPath {
    pub name: String,
}

/// One pool (role viewer).
#[utoipa::path(get, path = "/api/pipeline/pools/{name}", tag = "pipeline", security(("bearer" = [])),
    params(PoolPath),
    responses((status = 200, description = "The pool", body = PoolView),
              (status = 404, description = "No such pool")))]
pub async fn get_pool(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(PoolPath { name }): ApiPath<PoolPath>,
) -> Result<axum::Json<PoolView>, Problem> {
    let mut v = pool_views(&s, Some(&name)).await?;
    v.pop()
        .map(axum::Json)
        .ok_or_else(|| Problem::not_found(format!("no pool `{name}`")))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePool {
    #[schema(inline)]
    pub name: Text<250>,
    #[schema(inline)]
    pub slots: Bounded<0, 1_000_000>,
    #[schema(inline)]
    pub description: Option<Text<2000>>,
}

/// Create a pool (role admin).
#[utoipa::path(post, path = "/api/pipeline/pools", tag = "pipeline", security(("bearer" = [])),
    request_body = CreatePool,
    responses((status = 201, description = "Created", body = PoolView),
              (status = 400, description = "Invalid field"),
              (status = 403, description = "Role admin required"),
              (status = 409, description = "A pool with that name exists")))]
pub async fn create_pool(
    _a: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiJson(req): ApiJson<CreatePool>,
) -> Result<(StatusCode, axum::Json<PoolView>), Problem> {
    let slots = i32::try_from(req.slots.get()).unwrap_or(i32::MAX);
    let p = store::create_pool(
        &s.db,
        req.name.as_str(),
        slots,
        req.description.as_deref().unwrap_or(""),
    )
    .await
    .map_err(problem)?;
    let mut v = pool_views(&s, Some(&p.name)).await?;
    let v = v
        .pop()
        .ok_or_else(|| Problem::not_found(format!("no pool `{}`", p.name)))?;
    Ok((StatusCode::CREATED, axum::Json(v)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchPool {
    #[schema(inline)]
    pub slots: Option<Bounded<0, 1_000_000>>,
    #[schema(inline)]
    pub description: Option<Text<2000>>,
}

/// Change a pool's slots or description (role admin).
#[utoipa::path(patch, path = "/api/pipeline/pools/{name}", tag = "pipeline", security(("bearer" = [])),
    params(PoolPath), request_body = PatchPool,
    responses((status = 200, description = "Changed", body = PoolView),
              (status = 400, description = "Invalid field"),
              (status = 403, description = "Role admin required"),
              (status = 404, description = "No such pool")))]
pub async fn patch_pool(
    _a: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiPath(PoolPath { name }): ApiPath<PoolPath>,
    ApiJson(req): ApiJson<PatchPool>,
) -> Result<axum::Json<PoolView>, Problem> {
    store::update_pool(
        &s.db,
        &name,
        req.slots
            .map(|v| i32::try_from(v.get()).unwrap_or(i32::MAX)),
        req.description.as_deref(),
    )
    .await
    .map_err(problem)?;
    s.wake_scheduler();
    let mut v = pool_views(&s, Some(&name)).await?;
    v.pop()
        .map(axum::Json)
        .ok_or_else(|| Problem::not_found(format!("no pool `{name}`")))
}

// ---------------------------------------------------------------------------------------------
// Import errors and datasets

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImportErrorView {
    pub file: String,
    /// 1-based; 0 when the problem has no line.
    pub line: i32,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImportErrorList {
    pub import_errors: Vec<ImportErrorView>,
}

/// DAG files that failed to load at the last reload, with file and line (role viewer).
#[utoipa::path(get, path = "/api/pipeline/importErrors", tag = "pipeline", security(("bearer" = [])),
    responses((status = 200, description = "The errors", body = ImportErrorList)))]
pub async fn import_errors(
    _a: Auth<require::Viewer>,
    State(s): State<Shared>,
) -> Result<axum::Json<ImportErrorList>, Problem> {
    let rows = store::import_errors(&s.db).await.map_err(problem)?;
    Ok(axum::Json(ImportErrorList {
        import_errors: rows
            .into_iter()
            .map(|e| ImportErrorView {
                file: e.file,
                line: e.line,
                message: e.message,
            })
            .collect(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DatasetPath {
    /// 1 to 250 of letters, digits and `_.:-`.
    #[param(pattern = r"^[A-Za-z0-9_.:-]{1,250}$")]
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetEvent {
    /// Free-form facts about the new version (a row count, a path).
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DatasetEventView {
    pub id: i64,
    pub dataset: String,
}

/// Record a new version of a dataset (role admin): DAGs scheduled on it get a run, sensors
/// waiting for it fire.
#[utoipa::path(post, path = "/api/pipeline/datasets/{name}/events", tag = "pipeline", security(("bearer" = [])),
    params(DatasetPath), request_body = DatasetEvent,
    responses((status = 201, description = "Recorded", body = DatasetEventView),
              (status = 400, description = "Invalid name or body"),
              (status = 403, description = "Role admin required")))]
pub async fn dataset_event(
    _a: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiPath(DatasetPath { name }): ApiPath<DatasetPath>,
    ApiJson(req): ApiJson<DatasetEvent>,
) -> Result<(StatusCode, axum::Json<DatasetEventView>), Problem> {
    if !crate::dag::valid_dataset_name(&name) {
        return Err(bad(
            "name",
            "a dataset name is 1 to 250 of letters, digits and _.-:",
        ));
    }
    let extra = serde_json::Value::Object(req.extra.unwrap_or_default());
    let id = store::add_dataset_event(&s.db, &name, &extra, now_ms())
        .await
        .map_err(problem)?;
    s.wake_scheduler();
    Ok((
        StatusCode::CREATED,
        axum::Json(DatasetEventView { id, dataset: name }),
    ))
}
