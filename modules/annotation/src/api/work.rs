//! The annotator's loop: next task, locks, submit; plus the log and reviews.

use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bulwark_kernel::auth::{Auth, require};
use bulwark_kernel::http::{ApiJson, ApiPath, ApiQuery, Bounded, Limit, Text};
use bulwark_kernel::problem::Problem;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    AnnotationView, ItemView, Page, ReviewView, Shared, Verdict, annotation_view, at, item_view,
    problem, review_view,
};
use crate::store::{self, queue};

/// A held lock.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LockView {
    pub item_id: i64,
    pub annotator: String,
    /// The lock lapses by itself at this time unless extended (`POST .../lock` again).
    pub expires_at: DateTime<Utc>,
    pub ttl_seconds: i64,
}

fn lock_view(l: queue::Lock) -> LockView {
    let ttl = (l.expires_at_ms - store::now_ms()).max(0) / 1000;
    LockView {
        item_id: l.item_id,
        annotator: l.annotator,
        expires_at: at(l.expires_at_ms),
        ttl_seconds: ttl,
    }
}

/// The next item to label, locked for the caller.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub item: ItemView,
    pub lock: LockView,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NextParams {
    /// The project to work on.
    pub project: i64,
    /// Item ids to pass over, comma-separated (at most 100): the items the caller skipped.
    /// The caller's own lock on one of them is passed over too (release it first).
    #[param(pattern = "^[0-9]{1,18}(,[0-9]{1,18}){0,99}$")]
    pub skip: Option<String>,
}

/// The most item ids in `skip`.
pub const MAX_SKIP: usize = 100;

fn skip_list(text: Option<&str>) -> Result<Vec<i64>, Problem> {
    let bad = |m: String| {
        problem(store::StoreError::Invalid {
            field: "skip",
            message: m,
        })
    };
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(Vec::new());
    };
    let ids = text
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<i64>()
                .map_err(|_| bad(format!("{p:?} is not an item id")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() > MAX_SKIP {
        return Err(bad(format!("at most {MAX_SKIP} item ids")));
    }
    Ok(ids)
}

/// Claim the next item (role annotator, N1): the caller's live lock in the project if there is
/// one, else the first item by priority then age that the caller has not labeled and whose
/// annotations plus live locks are below the project's overlap; items in `skip` are passed
/// over. 204 when nothing is left.
#[utoipa::path(get, path = "/api/annotation/tasks/next", tag = "annotation", security(("bearer" = [])),
    params(NextParams),
    responses(
        (status = 200, description = "An item, locked for the caller", body = Task),
        (status = 204, description = "Nothing left for the caller in this project"),
        (status = 400, description = "A bad `skip` list (`field`: `skip`)"),
        (status = 404, description = "No such project"),
        (status = 503, description = "The annotation store is unavailable")
))]
pub async fn next(
    auth: Auth<require::Annotator>,
    State(s): State<Shared>,
    ApiQuery(q): ApiQuery<NextParams>,
) -> Result<Response, Problem> {
    let started = Instant::now();
    let skip = skip_list(q.skip.as_deref())?;
    let p = store::project(&s.db, q.project).await.map_err(problem)?;
    let claim = queue::next_task(&s.db, &p, &auth.subject, &skip)
        .await
        .map_err(problem)?;
    metrics::histogram!("bulwark_annotation_claim_seconds").record(started.elapsed().as_secs_f64());
    let outcome = match &claim {
        None => "empty",
        Some(c) if c.lock.new => "claimed",
        Some(_) => "existing",
    };
    metrics::counter!("bulwark_annotation_claims_total", "outcome" => outcome).increment(1);
    Ok(match claim {
        None => StatusCode::NO_CONTENT.into_response(),
        Some(c) => {
            if c.lock.new {
                metrics::counter!("bulwark_annotation_locks_granted_total").increment(1);
            }
            axum::Json(Task {
                item: item_view(c.item),
                lock: lock_view(c.lock),
            })
            .into_response()
        }
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ItemId {
    pub id: i64,
}

/// Lock an item, or extend the caller's lock (a heartbeat) (role annotator, N2). An item the
/// caller labeled already can be locked again to correct it.
#[utoipa::path(post, path = "/api/annotation/data/{id}/lock", tag = "annotation", security(("bearer" = [])),
    params(ItemId),
    responses(
        (status = 200, description = "Locked until `expires_at`", body = LockView),
        (status = 404, description = "No such item"),
        (status = 409, description = "`reason`: `overlap_reached` or `locked_by_others`")
))]
pub async fn lock(
    auth: Auth<require::Annotator>,
    State(s): State<Shared>,
    ApiPath(ItemId { id }): ApiPath<ItemId>,
) -> Result<axum::Json<LockView>, Problem> {
    let l = queue::lock(&s.db, id, &auth.subject)
        .await
        .map_err(problem)?;
    if l.new {
        metrics::counter!("bulwark_annotation_locks_granted_total").increment(1);
    }
    Ok(axum::Json(lock_view(l)))
}

/// Release the caller's lock (role annotator); 204 whether or not there was one.
#[utoipa::path(delete, path = "/api/annotation/data/{id}/lock", tag = "annotation", security(("bearer" = [])),
    params(ItemId),
    responses((status = 204, description = "No lock of the caller's remains on the item")))]
pub async fn unlock(
    auth: Auth<require::Annotator>,
    State(s): State<Shared>,
    ApiPath(ItemId { id }): ApiPath<ItemId>,
) -> Result<StatusCode, Problem> {
    queue::release(&s.db, id, &auth.subject)
        .await
        .map_err(problem)?;
    Ok(StatusCode::NO_CONTENT)
}

/// One item (role viewer).
#[utoipa::path(get, path = "/api/annotation/data/{id}", tag = "annotation", security(("bearer" = [])),
    params(ItemId),
    responses(
        (status = 200, description = "The item", body = ItemView),
        (status = 404, description = "No such item")
))]
pub async fn get_item(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(ItemId { id }): ApiPath<ItemId>,
) -> Result<axum::Json<ItemView>, Problem> {
    let i = store::item(&s.db, id).await.map_err(problem)?;
    Ok(axum::Json(item_view(i)))
}

/// A change to an item's editable fields, against the version read (N4).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateItem {
    #[schema(inline)]
    pub version: super::Version,
    /// Higher is served first.
    #[schema(inline)]
    pub priority: Option<crate::store::import::Priority>,
    pub metadata: Option<serde_json::Value>,
}

/// Change an item's priority or metadata (role admin). A stale `version` is refused with 409
/// `stale_version` and the `current_version`: no last write wins.
#[utoipa::path(patch, path = "/api/annotation/data/{id}", tag = "annotation", security(("bearer" = [])),
    params(ItemId), request_body = UpdateItem,
    responses(
        (status = 200, description = "Changed", body = ItemView),
        (status = 404, description = "No such item"),
        (status = 409, description = "Stale version (`reason`, `current_version`)")
))]
pub async fn update_item(
    _auth: Auth<require::Admin>,
    State(s): State<Shared>,
    ApiPath(ItemId { id }): ApiPath<ItemId>,
    ApiJson(req): ApiJson<UpdateItem>,
) -> Result<axum::Json<ItemView>, Problem> {
    let change = store::ItemChange {
        version: req.version.get(),
        priority: req
            .priority
            .map(|p| i32::try_from(p.get()).unwrap_or_default()),
        metadata: req.metadata,
    };
    let i = store::update_item(&s.db, id, change)
        .await
        .map_err(problem)?;
    Ok(axum::Json(item_view(i)))
}

/// An annotation to store.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitAnnotation {
    #[schema(inline)]
    pub item_id: super::Id,
    /// Classes of the project's schema: exactly one unless the project is multi-label.
    #[schema(min_items = 1, max_items = 200)]
    pub labels: Vec<String>,
    /// Made by the client, 1 to 100 characters: a retry with the same id returns the first
    /// result instead of storing twice.
    #[schema(inline)]
    pub request_id: Text<100>,
    /// Correct one of the caller's own records on this item: a new record that replaces it.
    #[schema(inline)]
    pub supersedes: Option<super::Id>,
    /// Milliseconds the annotator spent on the item, if the client measured it.
    #[schema(inline)]
    pub lead_time_ms: Option<Bounded<0, { i64::MAX }>>,
}

/// The most classes in one annotation.
const MAX_ANNOTATION_LABELS: usize = 200;

/// Store an annotation (role annotator, N3). Needs the caller's live lock on the item (409
/// `no_lock` or `lock_expired` otherwise); releases it. Records are appended, never updated:
/// a change is a correction with `supersedes` (N4). 201 for a new record, 200 with the first
/// record for a retried `request_id`.
#[utoipa::path(post, path = "/api/annotation/annotations", tag = "annotation", security(("bearer" = [])),
    request_body = SubmitAnnotation,
    responses(
        (status = 201, description = "Stored", body = AnnotationView),
        (status = 200, description = "A retry: the first result of this `request_id`", body = AnnotationView),
        (status = 400, description = "A label outside the schema (`field`: `labels`), or a bad `supersedes`"),
        (status = 404, description = "No such item"),
        (status = 409, description = "`reason`: `no_lock`, `lock_expired`, `already_annotated` or `already_superseded`")
))]
pub async fn submit(
    auth: Auth<require::Annotator>,
    State(s): State<Shared>,
    ApiJson(req): ApiJson<SubmitAnnotation>,
) -> Result<(StatusCode, axum::Json<AnnotationView>), Problem> {
    let started = Instant::now();
    if req.labels.len() > MAX_ANNOTATION_LABELS {
        return Err(problem(store::StoreError::Invalid {
            field: "labels",
            message: format!("at most {MAX_ANNOTATION_LABELS} labels"),
        }));
    }
    let correction = req.supersedes.is_some();
    let done = queue::submit(
        &s.db,
        &auth.subject,
        queue::Submit {
            item_id: req.item_id.get(),
            labels: req.labels,
            request_id: req.request_id.into_string(),
            supersedes: req.supersedes.map(Bounded::get),
            lead_time_ms: req.lead_time_ms.map(Bounded::get),
        },
    )
    .await
    .map_err(problem)?;
    metrics::histogram!("bulwark_annotation_submit_seconds")
        .record(started.elapsed().as_secs_f64());
    let kind = if done.replay {
        "replay"
    } else if correction {
        "correction"
    } else {
        "new"
    };
    metrics::counter!("bulwark_annotation_submits_total", "kind" => kind).increment(1);
    let status = if done.replay {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, axum::Json(annotation_view(done.annotation))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogParams {
    pub project: i64,
    /// Cursor: the previous page's `next`.
    pub after: Option<i64>,
    #[serde(default)]
    #[param(inline)]
    pub limit: Limit,
}

/// A project's annotation log, corrections included, by id (role viewer).
#[utoipa::path(get, path = "/api/annotation/annotations", tag = "annotation", security(("bearer" = [])),
    params(LogParams),
    responses((status = 200, description = "A page of records", body = Page<AnnotationView>)))]
pub async fn list_annotations(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiQuery(q): ApiQuery<LogParams>,
) -> Result<axum::Json<Page<AnnotationView>>, Problem> {
    let limit = q.limit.get();
    let rows = store::annotations(&s.db, q.project, q.after, limit)
        .await
        .map_err(problem)?;
    Ok(axum::Json(Page::of(rows, limit, |r| r.id, annotation_view)))
}

/// Every record of one item, oldest first (role viewer): its audit trail.
#[utoipa::path(get, path = "/api/annotation/data/{id}/annotations", tag = "annotation", security(("bearer" = [])),
    params(ItemId),
    responses(
        (status = 200, description = "The item's records", body = Vec<AnnotationView>),
        (status = 404, description = "No such item")
))]
pub async fn item_annotations(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(ItemId { id }): ApiPath<ItemId>,
) -> Result<axum::Json<Vec<AnnotationView>>, Problem> {
    store::item(&s.db, id).await.map_err(problem)?;
    let rows = store::item_annotations(&s.db, id).await.map_err(problem)?;
    Ok(axum::Json(rows.into_iter().map(annotation_view).collect()))
}

/// A review.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddReview {
    pub verdict: Verdict,
    /// Up to 2,000 characters.
    #[serde(default)]
    #[schema(inline)]
    pub comment: Option<Text<{ MAX_COMMENT }>>,
}

/// The longest review comment.
pub const MAX_COMMENT: usize = 2000;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AnnotationId {
    pub id: i64,
}

/// Accept or reject an annotation (role reviewer, or admin). Reviews are appended; the latest
/// counts. Nobody reviews their own annotation (403).
#[utoipa::path(post, path = "/api/annotation/annotations/{id}/reviews", tag = "annotation", security(("bearer" = [])),
    params(AnnotationId), request_body = AddReview,
    responses(
        (status = 201, description = "Recorded", body = ReviewView),
        (status = 403, description = "Role reviewer required, or the caller's own annotation"),
        (status = 404, description = "No such annotation")
))]
pub async fn review(
    auth: Auth<require::Reviewer>,
    State(s): State<Shared>,
    ApiPath(AnnotationId { id }): ApiPath<AnnotationId>,
    ApiJson(req): ApiJson<AddReview>,
) -> Result<(StatusCode, axum::Json<ReviewView>), Problem> {
    let comment = req.comment.map(Text::into_string).unwrap_or_default();
    let r = store::add_review(
        &s.db,
        id,
        &auth.subject,
        req.verdict == Verdict::Accept,
        comment,
    )
    .await
    .map_err(problem)?;
    Ok((StatusCode::CREATED, axum::Json(review_view(r))))
}

/// An annotation's reviews, oldest first (role viewer).
#[utoipa::path(get, path = "/api/annotation/annotations/{id}/reviews", tag = "annotation", security(("bearer" = [])),
    params(AnnotationId),
    responses(
        (status = 200, description = "Reviews", body = Vec<ReviewView>),
        (status = 404, description = "No such annotation")
))]
pub async fn reviews(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(AnnotationId { id }): ApiPath<AnnotationId>,
) -> Result<axum::Json<Vec<ReviewView>>, Problem> {
    store::annotation(&s.db, id).await.map_err(problem)?;
    let rows = store::reviews(&s.db, id).await.map_err(problem)?;
    Ok(axum::Json(rows.into_iter().map(review_view).collect()))
}
