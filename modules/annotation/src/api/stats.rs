//! Progress (N6), from counters only: its cost does not grow with the project.

use axum::extract::State;
use bulwark_kernel::auth::{Auth, require};
use bulwark_kernel::http::{ApiPath, ApiQuery, Bounded};
use bulwark_kernel::problem::Problem;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Shared, problem};
use crate::agreement;
use crate::store::{self, stats};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ProgressParams {
    pub project: i64,
    /// Days of per-annotator throughput, today included (1 to 366, default 14).
    #[param(inline)]
    pub days: Option<Bounded<1, 366>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LabelCount {
    pub label: String,
    /// Current annotations carrying the label (a correction moves its count).
    pub count: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DailyThroughput {
    /// UTC day, `YYYY-MM-DD`.
    pub day: String,
    pub annotator: String,
    /// New annotations that day (corrections not counted).
    pub submitted: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    pub project_id: i64,
    pub items: i64,
    /// Items with all the annotations they want.
    pub completed: i64,
    /// `completed / items`; 0 for a project without items.
    pub completion_ratio: f64,
    /// Items still below their wanted annotations.
    pub remaining: i64,
    pub annotations: i64,
    /// Every class of the schema, in its order.
    pub labels: Vec<LabelCount>,
    /// Newest day first.
    pub annotators: Vec<DailyThroughput>,
}

/// A project's progress (role viewer): completion, label distribution and each annotator's
/// daily throughput, read from counters kept with every write.
#[utoipa::path(get, path = "/api/annotation/stats/progress", tag = "annotation", security(("bearer" = [])),
    params(ProgressParams),
    responses(
        (status = 200, description = "Progress", body = Progress),
        (status = 404, description = "No such project")
))]
pub async fn progress(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiQuery(q): ApiQuery<ProgressParams>,
) -> Result<axum::Json<Progress>, Problem> {
    let p = store::project(&s.db, q.project).await.map_err(problem)?;
    let t = stats::totals(&s.db, p.id).await.map_err(problem)?;
    let classes = store::labels_of(&p);
    let labels = stats::label_counts(&s.db, p.id, &classes)
        .await
        .map_err(problem)?;
    let days = q.days.map_or(14, Bounded::get);
    let since = (chrono::Utc::now() - chrono::Duration::days(days - 1))
        .format("%Y-%m-%d")
        .to_string();
    let daily = stats::daily(&s.db, p.id, &since).await.map_err(problem)?;
    #[allow(clippy::cast_precision_loss)]
    let ratio = if t.items > 0 {
        t.completed as f64 / t.items as f64
    } else {
        0.0
    };
    Ok(axum::Json(Progress {
        project_id: p.id,
        items: t.items,
        completed: t.completed,
        completion_ratio: ratio,
        remaining: t.items - t.completed,
        annotations: t.annotations,
        labels: labels
            .into_iter()
            .map(|(label, count)| LabelCount { label, count })
            .collect(),
        annotators: daily
            .into_iter()
            .map(|d| DailyThroughput {
                day: d.day,
                annotator: d.annotator,
                submitted: d.submitted,
            })
            .collect(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AgreementParams {
    /// Fewest annotators for an item's consensus (default 2).
    #[param(inline)]
    pub min_votes: Option<Bounded<1, 100>>,
    /// What a tie resolves to: `review` (default: the item is unresolved) or
    /// `first_in_schema_order`.
    pub tie_rule: Option<agreement::TieRule>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ProjectId {
    pub id: i64,
}

/// Inter-annotator agreement of a project (role viewer, N5): percent agreement, Cohen's κ per
/// pair, Fleiss' κ, Krippendorff's α (nominal), per label; majority-vote consolidation; each
/// annotator's agreement with the consensus. Over the current record of every annotation
/// (corrections applied). Computed on request, in memory, in time linear in the annotations.
#[utoipa::path(get, path = "/api/annotation/projects/{id}/agreement", tag = "annotation", security(("bearer" = [])),
    params(ProjectId, AgreementParams),
    responses(
        (status = 200, description = "The report", body = agreement::AgreementReport),
        (status = 404, description = "No such project")
))]
pub async fn agreement_report(
    _auth: Auth<require::Viewer>,
    State(s): State<Shared>,
    ApiPath(ProjectId { id }): ApiPath<ProjectId>,
    ApiQuery(q): ApiQuery<AgreementParams>,
) -> Result<axum::Json<agreement::AgreementReport>, Problem> {
    let p = store::project(&s.db, id).await.map_err(problem)?;
    let rows = store::current_annotations(&s.db, p.id)
        .await
        .map_err(problem)?;
    let schema = agreement::Schema {
        classes: store::labels_of(&p),
        multi_label: p.multi_label,
    };
    let mut rule = agreement::ConsolidationRule::default();
    if let Some(m) = q.min_votes {
        rule.min_votes = u32::try_from(m.get()).unwrap_or(2);
    }
    if let Some(t) = q.tie_rule {
        rule.tie_rule = t;
    }
    let report = tokio::task::spawn_blocking(move || agreement::report(&rows, &schema, &rule))
        .await
        .map_err(|e| Problem::internal(e.to_string()))?;
    Ok(axum::Json(report))
}
