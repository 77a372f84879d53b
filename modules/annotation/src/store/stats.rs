//! Progress from the counters (N6): a handful of rows per project, whatever its size.

use sea_orm::{ConnectionTrait, DatabaseConnection};

use super::{Result, col_i64, sql};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub items: i64,
    pub completed: i64,
    pub annotations: i64,
}

pub async fn totals(db: &impl ConnectionTrait, project_id: i64) -> Result<Totals> {
    let row = db
        .query_one(sql(
            db,
            "SELECT CAST(COALESCE(SUM(items), 0) AS BIGINT) AS items, \
                    CAST(COALESCE(SUM(completed), 0) AS BIGINT) AS completed, \
                    CAST(COALESCE(SUM(annotations), 0) AS BIGINT) AS annotations \
             FROM annotation_counts WHERE project_id = $1",
            vec![project_id.into()],
        ))
        .await?;
    Ok(match row {
        Some(r) => Totals {
            items: col_i64(&r, "items")?,
            completed: col_i64(&r, "completed")?,
            annotations: col_i64(&r, "annotations")?,
        },
        None => Totals::default(),
    })
}

/// Each label's count of current annotations, in the order given.
pub async fn label_counts(
    db: &DatabaseConnection,
    project_id: i64,
    labels: &[String],
) -> Result<Vec<(String, i64)>> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT label, CAST(SUM(count) AS BIGINT) AS n FROM annotation_label_counts \
             WHERE project_id = $1 GROUP BY label",
            vec![project_id.into()],
        ))
        .await?;
    let mut counts = std::collections::HashMap::new();
    for r in rows {
        counts.insert(r.try_get::<String>("", "label")?, col_i64(&r, "n")?);
    }
    Ok(labels
        .iter()
        .map(|l| (l.clone(), counts.get(l).copied().unwrap_or(0)))
        .collect())
}

/// One annotator's new annotations on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daily {
    pub day: String,
    pub annotator: String,
    pub submitted: i64,
}

/// Daily throughput from `since` (`YYYY-MM-DD`, inclusive), newest day first.
pub async fn daily(db: &DatabaseConnection, project_id: i64, since: &str) -> Result<Vec<Daily>> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT day, annotator, submitted FROM annotation_daily \
             WHERE project_id = $1 AND day >= $2 ORDER BY day DESC, annotator",
            vec![project_id.into(), since.into()],
        ))
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Daily {
                day: r.try_get("", "day")?,
                annotator: r.try_get("", "annotator")?,
                submitted: col_i64(&r, "submitted")?,
            })
        })
        .collect()
}

/// Items below their wanted annotations, per project (the queue-depth gauge).
pub async fn queue_depths(db: &DatabaseConnection) -> Result<Vec<(i64, String, i64)>> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT p.id, p.name, \
                    CAST(COALESCE(SUM(c.items), 0) - COALESCE(SUM(c.completed), 0) AS BIGINT) AS depth \
             FROM annotation_projects p LEFT JOIN annotation_counts c ON c.project_id = p.id \
             GROUP BY p.id, p.name ORDER BY p.id",
            vec![],
        ))
        .await?;
    rows.into_iter()
        .map(|r| {
            Ok((
                col_i64(&r, "id")?,
                r.try_get("", "name")?,
                col_i64(&r, "depth")?,
            ))
        })
        .collect()
}
