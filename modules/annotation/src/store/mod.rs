//! The module's database side. Every write that changes what the progress report counts
//! updates the counters in the same transaction (see the migration's notes).
//!
//! SQL here is written once for both backends: `$N` placeholders (sqlx binds them by number
//! on SQLite too), `ON CONFLICT ... DO UPDATE`, `RETURNING`, and casts where PostgreSQL would
//! otherwise answer `NUMERIC`.

use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, Set, Statement, TransactionTrait, Value,
};

use crate::entity::{annotation, item, project, review};

pub mod import;
pub mod queue;
pub mod stats;

/// Counter rows per project: concurrent submits spread their updates over this many rows.
pub const COUNTER_SHARDS: i32 = 16;

/// Why a write was refused with 409 (the `reason` of the problem, and a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictReason {
    /// Submit without a lock on the item.
    NoLock,
    /// Submit after the caller's lock lapsed.
    LockExpired,
    /// Every wanted annotation of the item is done or held by other annotators' locks.
    LockedByOthers,
    /// The item has all the annotations it wants.
    OverlapReached,
    /// The caller already labeled the item; a change is a correction (`supersedes`).
    AlreadyAnnotated,
    /// The annotation named in `supersedes` was corrected already.
    AlreadySuperseded,
    /// The write named a version that is no longer current.
    StaleVersion,
    /// A project with that name exists.
    NameTaken,
}

impl ConflictReason {
    pub const ALL: [ConflictReason; 8] = [
        Self::NoLock,
        Self::LockExpired,
        Self::LockedByOthers,
        Self::OverlapReached,
        Self::AlreadyAnnotated,
        Self::AlreadySuperseded,
        Self::StaleVersion,
        Self::NameTaken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoLock => "no_lock",
            Self::LockExpired => "lock_expired",
            Self::LockedByOthers => "locked_by_others",
            Self::OverlapReached => "overlap_reached",
            Self::AlreadyAnnotated => "already_annotated",
            Self::AlreadySuperseded => "already_superseded",
            Self::StaleVersion => "stale_version",
            Self::NameTaken => "name_taken",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] DbErr),
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Conflict {
        reason: ConflictReason,
        message: String,
        /// For `stale_version`: the version to retry against.
        current_version: Option<i64>,
    },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    Forbidden(String),
}

impl StoreError {
    pub(crate) fn conflict(reason: ConflictReason, message: impl Into<String>) -> Self {
        Self::Conflict {
            reason,
            message: message.into(),
            current_version: None,
        }
    }
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// A statement for `db`'s backend.
pub(crate) fn sql(db: &impl ConnectionTrait, text: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(db.get_database_backend(), text, values)
}

pub(crate) fn is_postgres(db: &impl ConnectionTrait) -> bool {
    db.get_database_backend() == sea_orm::DbBackend::Postgres
}

/// A row's `i64` column, or a decoding error naming it.
pub(crate) fn col_i64(row: &sea_orm::QueryResult, name: &str) -> std::result::Result<i64, DbErr> {
    row.try_get::<i64>("", name)
}

pub(crate) fn shard() -> i32 {
    rand::random_range(0..COUNTER_SHARDS)
}

/// Add to a project's counters (one shard row).
pub(crate) async fn add_counts(
    db: &impl ConnectionTrait,
    project_id: i64,
    items: i64,
    completed: i64,
    annotations: i64,
) -> std::result::Result<(), DbErr> {
    if items == 0 && completed == 0 && annotations == 0 {
        return Ok(());
    }
    db.execute(sql(
        db,
        "INSERT INTO annotation_counts (project_id, shard, items, completed, annotations) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (project_id, shard) DO UPDATE SET \
           items = annotation_counts.items + excluded.items, \
           completed = annotation_counts.completed + excluded.completed, \
           annotations = annotation_counts.annotations + excluded.annotations",
        vec![
            project_id.into(),
            shard().into(),
            items.into(),
            completed.into(),
            annotations.into(),
        ],
    ))
    .await
    .map(|_| ())
}

/// Add `delta` to each label's count.
pub(crate) async fn add_label_counts(
    db: &impl ConnectionTrait,
    project_id: i64,
    labels: &[String],
    delta: i64,
) -> std::result::Result<(), DbErr> {
    let s = shard();
    for label in labels {
        db.execute(sql(
            db,
            "INSERT INTO annotation_label_counts (project_id, label, shard, count) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (project_id, label, shard) DO UPDATE SET \
               count = annotation_label_counts.count + excluded.count",
            vec![
                project_id.into(),
                label.clone().into(),
                s.into(),
                delta.into(),
            ],
        ))
        .await?;
    }
    Ok(())
}

// ---- projects ----

/// A validated project to create.
#[derive(Debug, Clone)]
pub struct NewProject {
    pub name: String,
    pub instructions: String,
    pub labels: Vec<String>,
    pub multi_label: bool,
    pub overlap: i32,
    pub lock_ttl_ms: i64,
}

pub async fn create_project(db: &DatabaseConnection, p: NewProject) -> Result<project::Model> {
    let labels = serde_json::to_string(&p.labels).unwrap_or_else(|_| "[]".into());
    let model = project::ActiveModel {
        name: Set(p.name.clone()),
        instructions: Set(p.instructions),
        labels: Set(labels),
        multi_label: Set(p.multi_label),
        overlap: Set(p.overlap),
        lock_ttl_ms: Set(p.lock_ttl_ms),
        version: Set(1),
        created_at_ms: Set(now_ms()),
        ..Default::default()
    };
    match model.insert(db).await {
        Ok(m) => Ok(m),
        Err(e)
            if matches!(
                e.sql_err(),
                Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
            ) =>
        {
            Err(StoreError::conflict(
                ConflictReason::NameTaken,
                format!("a project named {:?} exists", p.name),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn project(db: &impl ConnectionTrait, id: i64) -> Result<project::Model> {
    project::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no project {id}")))
}

pub async fn project_by_name(db: &impl ConnectionTrait, name: &str) -> Result<project::Model> {
    project::Entity::find()
        .filter(project::Column::Name.eq(name))
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no project named {name:?}")))
}

pub async fn projects(
    db: &DatabaseConnection,
    after: Option<i64>,
    limit: u64,
) -> Result<Vec<project::Model>> {
    let mut q = project::Entity::find().order_by_asc(project::Column::Id);
    if let Some(a) = after {
        q = q.filter(project::Column::Id.gt(a));
    }
    Ok(q.limit(limit).all(db).await?)
}

/// The project's classes, in schema order.
pub fn labels_of(p: &project::Model) -> Vec<String> {
    serde_json::from_str(&p.labels).unwrap_or_default()
}

/// Changes to a project's editable fields, against the version the caller read (N4).
#[derive(Debug, Clone, Default)]
pub struct ProjectChange {
    pub version: i64,
    pub instructions: Option<String>,
    pub overlap: Option<i32>,
    pub lock_ttl_ms: Option<i64>,
}

/// Apply `change` if the project is still at `change.version`; else 409 with the current one.
/// A new overlap re-judges which items are done, and the completed counter with them.
pub async fn update_project(
    db: &DatabaseConnection,
    id: i64,
    change: ProjectChange,
) -> Result<project::Model> {
    let tx = db.begin().await?;
    bulwark_kernel::db::lock_for_write(&tx).await?;
    let current = project(&tx, id).await?;
    if current.version != change.version {
        return Err(StoreError::Conflict {
            reason: ConflictReason::StaleVersion,
            message: format!(
                "project {id} is at version {}, not {}",
                current.version, change.version
            ),
            current_version: Some(current.version),
        });
    }
    let res = project::Entity::update_many()
        .col_expr(
            project::Column::Version,
            sea_orm::sea_query::Expr::col(project::Column::Version).add(1),
        )
        .col_expr(
            project::Column::Instructions,
            change
                .instructions
                .clone()
                .unwrap_or(current.instructions.clone())
                .into(),
        )
        .col_expr(
            project::Column::Overlap,
            change.overlap.unwrap_or(current.overlap).into(),
        )
        .col_expr(
            project::Column::LockTtlMs,
            change.lock_ttl_ms.unwrap_or(current.lock_ttl_ms).into(),
        )
        .filter(project::Column::Id.eq(id))
        .filter(project::Column::Version.eq(change.version))
        .exec(&tx)
        .await?;
    if res.rows_affected != 1 {
        return Err(StoreError::conflict(
            ConflictReason::StaleVersion,
            format!("project {id} changed meanwhile"),
        ));
    }
    if let Some(overlap) = change.overlap.filter(|o| *o != current.overlap) {
        tx.execute(sql(
            &tx,
            "UPDATE annotation_items SET done = (annotation_count >= $2) \
             WHERE project_id = $1 AND done <> (annotation_count >= $2)",
            vec![id.into(), overlap.into()],
        ))
        .await?;
        // An admin's rare change may count; the request path never does.
        let row = tx
            .query_one(sql(
                &tx,
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM annotation_items \
                 WHERE project_id = $1 AND done",
                vec![id.into()],
            ))
            .await?;
        let completed = row.map(|r| col_i64(&r, "n")).transpose()?.unwrap_or(0);
        tx.execute(sql(
            &tx,
            "INSERT INTO annotation_counts (project_id, shard, items, completed, annotations) \
             VALUES ($1, 0, 0, 0, 0) ON CONFLICT (project_id, shard) DO NOTHING",
            vec![id.into()],
        ))
        .await?;
        tx.execute(sql(
            &tx,
            "UPDATE annotation_counts SET completed = CASE WHEN shard = 0 THEN $2 ELSE 0 END \
             WHERE project_id = $1",
            vec![id.into(), completed.into()],
        ))
        .await?;
    }
    let updated = project(&tx, id).await?;
    tx.commit().await?;
    Ok(updated)
}

// ---- items ----

pub async fn item(db: &impl ConnectionTrait, id: i64) -> Result<item::Model> {
    item::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no item {id}")))
}

/// Items of a project by ascending id after `after` (keyset: the cost does not grow with depth).
pub async fn items(
    db: &DatabaseConnection,
    project_id: i64,
    after: Option<i64>,
    limit: u64,
) -> Result<Vec<item::Model>> {
    let mut q = item::Entity::find()
        .filter(item::Column::ProjectId.eq(project_id))
        .order_by_asc(item::Column::Id);
    if let Some(a) = after {
        q = q.filter(item::Column::Id.gt(a));
    }
    Ok(q.limit(limit).all(db).await?)
}

/// Changes to an item's editable fields, against the version the caller read (N4).
#[derive(Debug, Clone, Default)]
pub struct ItemChange {
    pub version: i64,
    pub priority: Option<i32>,
    pub metadata: Option<serde_json::Value>,
}

pub async fn update_item(
    db: &DatabaseConnection,
    id: i64,
    change: ItemChange,
) -> Result<item::Model> {
    let current = item(db, id).await?;
    let mut q = item::Entity::update_many()
        .col_expr(
            item::Column::Version,
            sea_orm::sea_query::Expr::col(item::Column::Version).add(1),
        )
        .filter(item::Column::Id.eq(id))
        .filter(item::Column::Version.eq(change.version));
    if let Some(p) = change.priority {
        q = q.col_expr(item::Column::Priority, p.into());
    }
    if let Some(m) = &change.metadata {
        q = q.col_expr(item::Column::Metadata, m.to_string().into());
    }
    let res = q.exec(db).await?;
    if res.rows_affected != 1 {
        let now = item(db, id).await?;
        return Err(StoreError::Conflict {
            reason: ConflictReason::StaleVersion,
            message: format!(
                "item {id} is at version {}, not {}",
                now.version, change.version
            ),
            current_version: Some(now.version.max(current.version)),
        });
    }
    item(db, id).await
}

// ---- annotations and reviews ----

pub async fn annotation(db: &impl ConnectionTrait, id: i64) -> Result<annotation::Model> {
    annotation::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no annotation {id}")))
}

/// A project's annotation records (corrections included) by ascending id after `after`.
pub async fn annotations(
    db: &DatabaseConnection,
    project_id: i64,
    after: Option<i64>,
    limit: u64,
) -> Result<Vec<annotation::Model>> {
    let mut q = annotation::Entity::find()
        .filter(annotation::Column::ProjectId.eq(project_id))
        .order_by_asc(annotation::Column::Id);
    if let Some(a) = after {
        q = q.filter(annotation::Column::Id.gt(a));
    }
    Ok(q.limit(limit).all(db).await?)
}

/// Every record of one item, oldest first.
pub async fn item_annotations(
    db: &DatabaseConnection,
    item_id: i64,
) -> Result<Vec<annotation::Model>> {
    Ok(annotation::Entity::find()
        .filter(annotation::Column::ItemId.eq(item_id))
        .order_by_asc(annotation::Column::Id)
        .all(db)
        .await?)
}

/// Record a reviewer's verdict on an annotation. Reviews are appended too: the latest one
/// counts. Nobody reviews their own annotation.
pub async fn add_review(
    db: &DatabaseConnection,
    annotation_id: i64,
    reviewer: &str,
    accept: bool,
    comment: String,
) -> Result<review::Model> {
    let a = annotation(db, annotation_id).await?;
    if a.annotator == reviewer {
        return Err(StoreError::Forbidden(
            "an annotation is reviewed by someone other than its annotator".into(),
        ));
    }
    let model = review::ActiveModel {
        annotation_id: Set(a.id),
        project_id: Set(a.project_id),
        reviewer: Set(reviewer.to_owned()),
        verdict: Set(if accept { "accept" } else { "reject" }.into()),
        comment: Set(comment),
        created_at_ms: Set(now_ms()),
        ..Default::default()
    };
    Ok(model.insert(db).await?)
}

pub async fn reviews(db: &DatabaseConnection, annotation_id: i64) -> Result<Vec<review::Model>> {
    Ok(review::Entity::find()
        .filter(review::Column::AnnotationId.eq(annotation_id))
        .order_by_asc(review::Column::Id)
        .all(db)
        .await?)
}

/// The current record of each (item, annotator) of a project: the one no other record
/// supersedes. In item then annotator order.
pub async fn current_annotations(
    db: &DatabaseConnection,
    project_id: i64,
) -> Result<Vec<crate::agreement::Row>> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT a.item_id, a.annotator, a.labels FROM annotation_annotations a \
             WHERE a.project_id = $1 AND NOT EXISTS \
               (SELECT 1 FROM annotation_annotations s WHERE s.supersedes = a.id) \
             ORDER BY a.item_id, a.annotator",
            vec![project_id.into()],
        ))
        .await?;
    rows.into_iter()
        .map(|r| {
            let labels: String = r.try_get("", "labels")?;
            Ok(crate::agreement::Row {
                item: r.try_get("", "item_id")?,
                annotator: r.try_get("", "annotator")?,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
            })
        })
        .collect()
}
