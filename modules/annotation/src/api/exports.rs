//! Dataset exports (N8, N9): request a job, follow it, download its file. Role admin for all
//! three: a dataset is the whole project's labels, and the export worker's disk is spent on it.

use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bulwark_kernel::auth::{Auth, require};
use bulwark_kernel::http::{ApiJson, ApiPath};
use bulwark_kernel::problem::Problem;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Shared, at, problem};
use crate::dataset::{DatasetError, DatasetSpec, Format, Manifest};
use crate::entity::export as export_e;
use crate::export::{self, State as JobState};
use crate::store;

/// An export job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ExportView {
    pub id: i64,
    pub project_id: i64,
    pub format: Format,
    pub state: JobState,
    /// Rows written so far.
    pub rows_done: i64,
    /// An estimate from the project's counters while running; exact once done.
    pub rows_total: Option<i64>,
    /// Of the data file, once done.
    pub sha256: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The spec, with `as_of` pinned to the request's time when it had none.
    pub spec: DatasetSpec,
    /// Once done.
    pub manifest: Option<Manifest>,
    /// Where to get the file, once done.
    pub download: Option<String>,
}

fn view(m: export_e::Model) -> Result<ExportView, Problem> {
    let spec: DatasetSpec = serde_json::from_str(&m.spec).map_err(|e| {
        tracing::warn!(message = "An export job's spec does not parse.", job = m.id, error = %e);
        Problem::unavailable("the export job's record is unreadable")
    })?;
    let state = JobState::parse(&m.state);
    Ok(ExportView {
        id: m.id,
        project_id: m.project_id,
        format: spec.format,
        state,
        rows_done: m.rows_done,
        rows_total: m.rows_total,
        sha256: m.sha256,
        error: m.error,
        created_by: m.created_by,
        created_at: at(m.created_at_ms),
        started_at: m.started_at_ms.map(at),
        finished_at: m.finished_at_ms.map(at),
        spec,
        manifest: m.manifest.and_then(|t| serde_json::from_str(&t).ok()),
        download: (state == JobState::Done)
            .then(|| format!("/api/annotation/exports/{}/download", m.id)),
    })
}

pub(crate) fn dataset_problem(e: DatasetError) -> Problem {
    match e {
        DatasetError::NotFound(m) => Problem::not_found(m),
        DatasetError::Invalid { field, message } => {
            Problem::bad_request(format!("{field}: {message}")).extension("field", field.into())
        }
        DatasetError::Db(e) => problem(store::StoreError::Db(e)),
        other => {
            tracing::warn!(message = "Export request failed.", error = %other);
            Problem::unavailable("the export could not be stored")
        }
    }
}

/// Request a dataset export (role admin, N8/N9). The job runs on a worker; follow it at
/// `GET /api/annotation/exports/{id}` and download the file when `state` is `done`. Without
/// `as_of` the dataset is pinned to the time of this request.
#[utoipa::path(post, path = "/api/annotation/exports", tag = "annotation", security(("bearer" = [])),
    request_body = DatasetSpec,
    responses(
        (status = 202, description = "Accepted: the job, pending", body = ExportView),
        (status = 400, description = "Invalid spec: an unknown field, a bad format or value (named in `field`)"),
        (status = 403, description = "Role admin required"),
        (status = 404, description = "No such project"),
        (status = 503, description = "The annotation store is unavailable")
))]
pub async fn create(
    auth: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiJson(spec): ApiJson<DatasetSpec>,
) -> Result<Response, Problem> {
    spec.validate().map_err(dataset_problem)?;
    store::project(&s.db, spec.project).await.map_err(problem)?;
    let spec = spec.resolved(store::now_ms());
    let job = export::create(&s.db, &spec, &auth.subject)
        .await
        .map_err(dataset_problem)?;
    let location = format!("/api/annotation/exports/{}", job.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        axum::Json(view(job)?),
    )
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ExportId {
    pub id: i64,
}

async fn job(s: &Shared, id: i64) -> Result<export_e::Model, Problem> {
    export::get(&s.db, id)
        .await
        .map_err(|e| problem(store::StoreError::Db(e)))?
        .ok_or_else(|| Problem::not_found(format!("no export {id}")))
}

/// An export job, with its manifest once done (role admin).
#[utoipa::path(get, path = "/api/annotation/exports/{id}", tag = "annotation", security(("bearer" = [])),
    params(ExportId),
    responses(
        (status = 200, description = "The job", body = ExportView),
        (status = 403, description = "Role admin required"),
        (status = 404, description = "No such export")
))]
pub async fn get_one(
    _auth: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiPath(ExportId { id }): ApiPath<ExportId>,
) -> Result<axum::Json<ExportView>, Problem> {
    Ok(axum::Json(view(job(&s, id).await?)?))
}

/// The data file of a finished export, streamed (role admin). `ETag` is its sha256.
#[utoipa::path(get, path = "/api/annotation/exports/{id}/download", tag = "annotation", security(("bearer" = [])),
    params(ExportId),
    responses(
        (status = 200, description = "The file (text/csv, application/x-ndjson or application/vnd.apache.parquet)"),
        (status = 403, description = "Role admin required"),
        (status = 404, description = "No such export, or its file is gone"),
        (status = 409, description = "Not done yet (or failed): `state` says which")
))]
pub async fn download(
    _auth: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiPath(ExportId { id }): ApiPath<ExportId>,
) -> Result<Response, Problem> {
    let m = job(&s, id).await?;
    let state = JobState::parse(&m.state);
    if state != JobState::Done {
        return Err(
            Problem::conflict(format!("export {id} is {}, not done", m.state))
                .extension("state", m.state.clone().into()),
        );
    }
    let v = view(m)?;
    let name = v
        .manifest
        .as_ref()
        .map_or_else(|| export::file_name(id, v.format), |m| m.file.name.clone());
    let path = s.export_dir.join(export::file_name(id, v.format));
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        tracing::warn!(message = "An export's file cannot be opened.", job = id, error = %e);
        Problem::not_found(format!("the file of export {id} is gone"))
    })?;
    let len = file.metadata().await.map(|m| m.len()).ok();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024);
    let mut res = Response::new(Body::from_stream(stream));
    let h = res.headers_mut();
    let mut put = |k: header::HeaderName, v: String| {
        if let Ok(v) = header::HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    put(header::CONTENT_TYPE, v.format.content_type().into());
    put(
        header::CONTENT_DISPOSITION,
        format!(
            "attachment; filename=\"{}\"",
            crate::dataset::safe_name(&name)
        ),
    );
    if let Some(len) = len {
        put(header::CONTENT_LENGTH, len.to_string());
    }
    if let Some(sha) = &v.sha256 {
        put(header::ETAG, format!("\"{sha}\""));
    }
    Ok(res)
}
