//! Projects and their items: create, read, change against a version, import.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use bulwark_kernel::auth::{Auth, require};
use bulwark_kernel::http::{ApiJson, ApiPath, ApiQuery, Bounded, Limit, Text};
use bulwark_kernel::problem::Problem;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ItemView, Page, ProjectView, Shared, item_view, problem, project_view};
use crate::config::{MAX_LOCK_TTL, MAX_OVERLAP};
use crate::store::{self, import};

/// The most classes a project can have.
pub const MAX_LABELS: usize = 200;

/// Annotations wanted per item: 1 to 100.
pub type Overlap = Bounded<1, { MAX_OVERLAP as i64 }>;
/// A lock's lifetime in seconds: 1 to 86,400.
pub type LockTtlSeconds = Bounded<1, { MAX_LOCK_TTL.as_secs() as i64 }>;

/// A project to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// 1 to 200 characters, unique.
    #[schema(inline)]
    pub name: Text<200>,
    /// Shown to annotators above the item (plain text or Markdown).
    #[serde(default)]
    #[schema(inline)]
    pub instructions: Option<Text<{ MAX_INSTRUCTIONS }>>,
    /// The classes, 1 to 200 names, in display order (keys 1–9 pick the first nine). A name
    /// given twice counts once, at its first place.
    #[schema(inline, min_items = 1, max_items = 200)]
    pub labels: Vec<Text<200>>,
    /// Several labels per annotation (default: exactly one).
    #[serde(default)]
    pub multi_label: bool,
    /// Default: `annotation.overlap` from config.
    #[schema(inline)]
    pub overlap: Option<Overlap>,
    /// Default: `annotation.lock_ttl` from config.
    #[schema(inline)]
    pub lock_ttl_seconds: Option<LockTtlSeconds>,
}

/// The longest instructions text.
pub const MAX_INSTRUCTIONS: usize = 20_000;

fn check_labels(labels: Vec<Text<200>>) -> Result<Vec<String>, Problem> {
    let bad = |m: String| {
        Problem::bad_request(format!("labels: {m}")).extension("field", "labels".into())
    };
    if labels.is_empty() || labels.len() > MAX_LABELS {
        return Err(bad(format!("give 1 to {MAX_LABELS} classes")));
    }
    let mut out: Vec<String> = Vec::with_capacity(labels.len());
    for l in labels {
        // Text trims blank ends, so "cat" and "cat " are one class given twice.
        if !out.iter().any(|o| o == l.as_str()) {
            out.push(l.into_string());
        }
    }
    Ok(out)
}

/// Create a project (role admin).
#[utoipa::path(post, path = "/api/annotation/projects", tag = "annotation", security(("bearer" = [])),
    request_body = CreateProject,
    responses(
        (status = 201, description = "Created", body = ProjectView),
        (status = 400, description = "Invalid field (named in `field`)"),
        (status = 409, description = "A project with that name exists (`reason`: `name_taken`)"),
        (status = 403, description = "Role admin required"),
        (status = 503, description = "The annotation store is unavailable")
))]
pub async fn create(
    _auth: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiJson(req): ApiJson<CreateProject>,
) -> Result<(StatusCode, axum::Json<ProjectView>), Problem> {
    let labels = check_labels(req.labels)?;
    let new = store::NewProject {
        name: req.name.into_string(),
        instructions: req.instructions.map(Text::into_string).unwrap_or_default(),
        labels,
        multi_label: req.multi_label,
        overlap: req
            .overlap
            .map_or(i32::try_from(s.cfg.overlap).unwrap_or(1), |o| {
                i32::try_from(o.get()).unwrap_or(1)
            }),
        lock_ttl_ms: req.lock_ttl_seconds.map_or(
            i64::try_from(s.cfg.lock_ttl.as_millis()).unwrap_or(i64::MAX),
            |t| t.get() * 1000,
        ),
    };
    let p = store::create_project(&s.db, new).await.map_err(problem)?;
    Ok((StatusCode::CREATED, axum::Json(project_view(p))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Cursor: the previous page's `next`.
    pub after: Option<i64>,
    #[serde(default)]
    #[param(inline)]
    pub limit: Limit,
}

/// List projects by id (role viewer).
#[utoipa::path(get, path = "/api/annotation/projects", tag = "annotation", security(("bearer" = [])),
    params(PageParams),
    responses((status = 200, description = "A page of projects", body = Page<ProjectView>)))]
pub async fn list(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> Result<axum::Json<Page<ProjectView>>, Problem> {
    let limit = p.limit.get();
    let rows = store::projects(&s.db, p.after, limit)
        .await
        .map_err(problem)?;
    Ok(axum::Json(Page::of(rows, limit, |r| r.id, project_view)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ProjectId {
    pub id: i64,
}

/// One project (role viewer).
#[utoipa::path(get, path = "/api/annotation/projects/{id}", tag = "annotation", security(("bearer" = [])),
    params(ProjectId),
    responses(
        (status = 200, description = "The project", body = ProjectView),
        (status = 404, description = "No such project")
))]
pub async fn get_one(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(ProjectId { id }): ApiPath<ProjectId>,
) -> Result<axum::Json<ProjectView>, Problem> {
    let p = store::project(&s.db, id).await.map_err(problem)?;
    Ok(axum::Json(project_view(p)))
}

/// A change to a project, against the version read (N4).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProject {
    /// The version the change was made against.
    #[schema(inline)]
    pub version: super::Version,
    #[schema(inline)]
    pub instructions: Option<Text<{ MAX_INSTRUCTIONS }>>,
    /// A new overlap re-judges which items are complete.
    #[schema(inline)]
    pub overlap: Option<Overlap>,
    #[schema(inline)]
    pub lock_ttl_seconds: Option<LockTtlSeconds>,
}

/// Change a project's instructions, overlap or lock TTL (role admin). A stale `version` is
/// refused with 409 `stale_version` and the `current_version`.
#[utoipa::path(patch, path = "/api/annotation/projects/{id}", tag = "annotation", security(("bearer" = [])),
    params(ProjectId), request_body = UpdateProject,
    responses(
        (status = 200, description = "Changed", body = ProjectView),
        (status = 404, description = "No such project"),
        (status = 409, description = "Stale version (`reason`, `current_version`)")
))]
pub async fn update(
    _auth: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiPath(ProjectId { id }): ApiPath<ProjectId>,
    ApiJson(req): ApiJson<UpdateProject>,
) -> Result<axum::Json<ProjectView>, Problem> {
    let change = store::ProjectChange {
        version: req.version.get(),
        instructions: req.instructions.map(Text::into_string),
        overlap: req.overlap.map(|o| i32::try_from(o.get()).unwrap_or(1)),
        lock_ttl_ms: req.lock_ttl_seconds.map(|t| t.get() * 1000),
    };
    let p = store::update_project(&s.db, id, change)
        .await
        .map_err(problem)?;
    Ok(axum::Json(project_view(p)))
}

/// What an import did, line by line.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImportReport {
    pub lines: u64,
    pub imported: u64,
    /// Lines whose `external_id` the project has already (left unchanged).
    pub existing: u64,
    pub failed: u64,
    /// The first 1,000 refused lines, with their line numbers.
    pub errors: Vec<ImportError>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImportError {
    pub line: u64,
    pub message: String,
}

pub(crate) fn import_report(r: import::Report) -> ImportReport {
    ImportReport {
        lines: r.lines,
        imported: r.imported,
        existing: r.existing,
        failed: r.failed,
        errors: r
            .errors
            .into_iter()
            .map(|e| ImportError {
                line: e.line,
                message: e.message,
            })
            .collect(),
    }
}

/// Import items (role admin) from JSON lines (`application/x-ndjson`: one object per line with
/// `external_id`, optional `uri`, `payload`, `metadata`, `priority`) or CSV (`text/csv`: a
/// header with `external_id` and any of `uri`, `priority`, `payload`, `metadata`; other columns
/// go into `payload`). Streamed in one pass; idempotent on `external_id`; bad lines are
/// reported with their number and the rest are imported. Bodies are bounded by
/// `server.body_limit_bytes`: import in parts (safe, as it is idempotent) or with
/// `bulwark annotation import`.
#[utoipa::path(post, path = "/api/annotation/projects/{id}/items", tag = "annotation", security(("bearer" = [])),
    params(ProjectId),
    request_body(
        description = "JSON lines (one `ItemLine` object per line), or CSV with a header",
        content(
            (Vec<import::ItemLine> = "application/x-ndjson"),
            (String = "text/csv"),
        ),
    ),
    responses(
        (status = 200, description = "Imported; refused lines listed", body = ImportReport),
        (status = 400, description = "The upload broke off (what was read is stored)"),
        (status = 404, description = "No such project"),
        (status = 415, description = "Neither JSON lines nor CSV")
))]
pub async fn import(
    _auth: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiPath(ProjectId { id }): ApiPath<ProjectId>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<ImportReport>, Problem> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let format = match ct.as_str() {
        "application/x-ndjson"
        | "application/jsonl"
        | "application/jsonlines"
        | "application/json" => import::Format::JsonLines,
        "text/csv" => import::Format::Csv,
        other => {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            )
            .detail(format!(
                "send application/x-ndjson or text/csv, not {:?}",
                if other.is_empty() { "nothing" } else { other }
            )));
        }
    };
    store::project(&s.db, id).await.map_err(problem)?;
    let stream = body
        .into_data_stream()
        .map_err(|e| std::io::Error::other(e.to_string()));
    let reader = tokio_util::io::StreamReader::new(stream);
    let report = import::import(
        &s.db,
        id,
        format,
        reader,
        s.cfg.max_import_line_bytes,
        &|_| {},
    )
    .await
    .map_err(problem)?;
    metrics::counter!("bulwark_annotation_import_errors_total").increment(report.failed);
    Ok(axum::Json(import_report(report)))
}

/// A project's items by id (role viewer), keyset-paginated: page 9,000 costs what page 1 costs.
#[utoipa::path(get, path = "/api/annotation/projects/{id}/items", tag = "annotation", security(("bearer" = [])),
    params(ProjectId, PageParams),
    responses(
        (status = 200, description = "A page of items", body = Page<ItemView>),
        (status = 404, description = "No such project")
))]
pub async fn items(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(ProjectId { id }): ApiPath<ProjectId>,
    ApiQuery(p): ApiQuery<PageParams>,
) -> Result<axum::Json<Page<ItemView>>, Problem> {
    let limit = p.limit.get();
    let rows = store::items(&s.db, id, p.after, limit)
        .await
        .map_err(problem)?;
    if rows.is_empty() && p.after.is_none() {
        store::project(&s.db, id).await.map_err(problem)?;
    }
    Ok(axum::Json(Page::of(rows, limit, |r| r.id, item_view)))
}
