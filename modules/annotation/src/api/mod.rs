//! REST surface (utoipa-documented, problem+json errors, keyset pagination everywhere: N7).
//! Handlers validate, call [`crate::store`], and map its errors: see [`problem`].

use std::sync::Arc;

use bulwark_kernel::http::Bounded;
use bulwark_kernel::problem::Problem;
use chrono::{DateTime, TimeZone as _, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AnnotationShared;
use crate::entity::{annotation, item, project, review};
use crate::store::{self, StoreError};

pub mod exports;
pub mod projects;
pub mod stats;
pub mod work;

pub type Shared = Arc<AnnotationShared>;

/// A row id in a request body (an unknown one is 404).
pub type Id = Bounded<1, { i64::MAX }>;
/// The version a change was made against.
pub type Version = Bounded<1, { i64::MAX }>;

pub(crate) fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// A store error as problem+json: 404, 409 with `reason` (and `current_version` for stale
/// writes), 400 naming the `field`, 403, or 503 for a database failure.
pub(crate) fn problem(e: StoreError) -> Problem {
    match e {
        StoreError::Db(e) => {
            tracing::warn!(message = "Annotation database error.", error = %e);
            Problem::unavailable("the annotation store is unavailable")
        }
        StoreError::NotFound(m) => Problem::not_found(m),
        StoreError::Conflict {
            reason,
            message,
            current_version,
        } => {
            metrics::counter!("bulwark_annotation_conflicts_total", "reason" => reason.as_str())
                .increment(1);
            let p = Problem::conflict(message).extension("reason", reason.as_str().into());
            match current_version {
                Some(v) => p.extension("current_version", v.into()),
                None => p,
            }
        }
        StoreError::Invalid { field, message } => {
            Problem::bad_request(format!("{field}: {message}")).extension("field", field.into())
        }
        StoreError::Forbidden(m) => Problem::forbidden(m),
    }
}

/// A page of results with the cursor of the next page.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<i64>,
}

impl<T> Page<T> {
    pub(crate) fn of<M>(
        rows: Vec<M>,
        limit: u64,
        id: impl Fn(&M) -> i64,
        view: impl Fn(M) -> T,
    ) -> Self {
        let next = (rows.len() as u64 == limit)
            .then(|| rows.last().map(&id))
            .flatten();
        Self {
            items: rows.into_iter().map(view).collect(),
            next,
        }
    }
}

/// A labeling project.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    pub id: i64,
    pub name: String,
    pub instructions: String,
    /// The classes, in the order the labeling page shows them (keys 1–9).
    pub labels: Vec<String>,
    pub multi_label: bool,
    /// Annotations wanted per item.
    pub overlap: i32,
    pub lock_ttl_seconds: i64,
    /// Send it back with a change; a stale one is refused (409 `stale_version`).
    pub version: i64,
    pub created_at: DateTime<Utc>,
}

pub(crate) fn project_view(p: project::Model) -> ProjectView {
    ProjectView {
        labels: store::labels_of(&p),
        id: p.id,
        name: p.name,
        instructions: p.instructions,
        multi_label: p.multi_label,
        overlap: p.overlap,
        lock_ttl_seconds: p.lock_ttl_ms / 1000,
        version: p.version,
        created_at: at(p.created_at_ms),
    }
}

/// A data item to label.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ItemView {
    pub id: i64,
    pub project_id: i64,
    pub external_id: String,
    pub uri: Option<String>,
    pub payload: Option<serde_json::Value>,
    pub metadata: Option<serde_json::Value>,
    pub priority: i32,
    pub version: i64,
    /// Annotations so far (corrections not counted).
    pub annotation_count: i32,
    pub created_at: DateTime<Utc>,
}

fn json_of(text: Option<String>) -> Option<serde_json::Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

pub(crate) fn item_view(i: item::Model) -> ItemView {
    ItemView {
        id: i.id,
        project_id: i.project_id,
        external_id: i.external_id,
        uri: i.uri,
        payload: json_of(i.payload),
        metadata: json_of(i.metadata),
        priority: i.priority,
        version: i.version,
        annotation_count: i.annotation_count,
        created_at: at(i.created_at_ms),
    }
}

/// One record of the append-only annotation log.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AnnotationView {
    pub id: i64,
    pub project_id: i64,
    pub item_id: i64,
    pub annotator: String,
    pub labels: Vec<String>,
    /// The record this one corrects.
    pub supersedes: Option<i64>,
    pub request_id: String,
    pub lead_time_ms: Option<i64>,
    pub created_at: DateTime<Utc>,
}

pub(crate) fn annotation_view(a: annotation::Model) -> AnnotationView {
    AnnotationView {
        labels: serde_json::from_str(&a.labels).unwrap_or_default(),
        id: a.id,
        project_id: a.project_id,
        item_id: a.item_id,
        annotator: a.annotator,
        supersedes: a.supersedes,
        request_id: a.request_id,
        lead_time_ms: a.lead_time_ms,
        created_at: at(a.created_at_ms),
    }
}

/// A reviewer's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Accept,
    Reject,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReviewView {
    pub id: i64,
    pub annotation_id: i64,
    pub reviewer: String,
    pub verdict: Verdict,
    pub comment: String,
    pub created_at: DateTime<Utc>,
}

pub(crate) fn review_view(r: review::Model) -> ReviewView {
    ReviewView {
        id: r.id,
        annotation_id: r.annotation_id,
        reviewer: r.reviewer,
        verdict: if r.verdict == "accept" {
            Verdict::Accept
        } else {
            Verdict::Reject
        },
        comment: r.comment,
        created_at: at(r.created_at_ms),
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        projects::create, projects::list, projects::get_one, projects::update,
        projects::import, projects::items,
        work::next, work::lock, work::unlock, work::get_item, work::update_item,
        work::submit, work::list_annotations, work::item_annotations,
        work::review, work::reviews,
        stats::progress, stats::agreement_report,
        exports::create, exports::get_one, exports::download,
    ),
    components(schemas(
        ProjectView, ItemView, AnnotationView, ReviewView, Verdict,
        Page<ProjectView>, Page<ItemView>, Page<AnnotationView>,
        exports::ExportView, crate::dataset::DatasetSpec, crate::dataset::Manifest,
    ))
)]
pub struct AnnotationApi;
