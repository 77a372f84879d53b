//! The work queue (N1–N3): claiming the next item, locks that lapse by themselves, and the
//! append-only submit.
//!
//! An item may be held by at most `overlap - annotation_count` live locks. Two backends, one
//! rule for keeping that bound under concurrency: **a lock row is only written by a statement
//! that re-counts the item's live locks after the writer has the item to itself.**
//! * PostgreSQL: the claim picks a candidate with `FOR UPDATE SKIP LOCKED` (claimers skip each
//!   other's candidates instead of queueing on them) and then inserts the lock with a second
//!   statement whose `WHERE` re-counts. Under READ COMMITTED that statement sees every lock
//!   committed before it started, and every other lock writer held the same row lock, so the
//!   count is exact. A candidate that fails the re-count is skipped and the next is tried.
//! * SQLite has one writer at a time and no `SKIP LOCKED`: the claim is one
//!   `INSERT ... SELECT` statement; SQLite takes the write lock before the statement reads,
//!   so the pick and the insert are atomic.
//!
//! A submit deletes the caller's lock and raises the item's `annotation_count` in the same
//! transaction, so `count + live locks` never grows past the bound.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, TransactionTrait, Value};

use super::{
    ConflictReason, Result, StoreError, add_counts, add_label_counts, col_i64, is_postgres, item,
    labels_of, now_ms, project, sql,
};
use crate::entity::{annotation, item as item_e, project as project_e};

/// A held lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    pub item_id: i64,
    pub annotator: String,
    pub expires_at_ms: i64,
    /// Whether this call created it (false: an existing lock returned or extended).
    pub new: bool,
}

/// The answer to "what should I label next?".
#[derive(Debug, Clone)]
pub struct Claim {
    pub item: item_e::Model,
    pub lock: Lock,
}

/// Candidates in queue order: not done, not labeled by `$2`, with a free slot now (`$3`).
/// `$1` project, `$4` overlap.
const CANDIDATE: &str = "FROM annotation_items i \
     WHERE i.project_id = $1 AND NOT i.done \
       AND NOT EXISTS (SELECT 1 FROM annotation_annotations a \
                       WHERE a.item_id = i.id AND a.annotator = $2) \
       AND i.annotation_count + (SELECT COUNT(*) FROM annotation_locks l \
                                 WHERE l.item_id = i.id AND l.expires_at_ms > $3 \
                                   AND l.annotator <> $2) < $4";

/// [`CANDIDATE`] without the items in `skip`, in queue order. The ids are integers written
/// into the text (no injection is possible); the list is bounded by the API.
fn candidates(skip: &[i64]) -> String {
    format!(
        "{CANDIDATE}{} ORDER BY i.priority DESC, i.id",
        not_in("i.id", skip)
    )
}

/// ` AND column NOT IN (1,2)`, or nothing for an empty list.
fn not_in(column: &str, ids: &[i64]) -> String {
    if ids.is_empty() {
        return String::new();
    }
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!(" AND {column} NOT IN ({})", list.join(","))
}

/// Insert or extend `$2`'s lock on item `$1` (project `$3`) until `$4`, but only while the
/// item's annotations plus other live locks (at `$5`) stay below `$6`; `$7` skips the check
/// (a correction: the caller's own labeled item). An extension keeps `acquired_at_ms`, so a
/// new lock is one whose `acquired_at_ms` is `$5`.
const LOCK_WITH_CHECK: &str = "INSERT INTO annotation_locks \
       (item_id, annotator, project_id, expires_at_ms, acquired_at_ms) \
     SELECT $1, $2, $3, $4, $5 \
     WHERE $7 OR (SELECT annotation_count FROM annotation_items WHERE id = $1) \
         + (SELECT COUNT(*) FROM annotation_locks \
            WHERE item_id = $1 AND expires_at_ms > $5 AND annotator <> $2) < $6 \
     ON CONFLICT (item_id, annotator) DO UPDATE SET \
       expires_at_ms = excluded.expires_at_ms, \
       acquired_at_ms = CASE WHEN annotation_locks.expires_at_ms > excluded.acquired_at_ms \
                             THEN annotation_locks.acquired_at_ms \
                             ELSE excluded.acquired_at_ms END \
     RETURNING expires_at_ms, acquired_at_ms";

fn lock_from(
    row: &sea_orm::QueryResult,
    item_id: i64,
    who: &str,
    now: i64,
) -> std::result::Result<Lock, DbErr> {
    Ok(Lock {
        item_id,
        annotator: who.to_owned(),
        expires_at_ms: col_i64(row, "expires_at_ms")?,
        new: col_i64(row, "acquired_at_ms")? == now,
    })
}

/// The caller's live lock in a project on an item they have not labeled yet, if any.
async fn live_lock(
    db: &impl ConnectionTrait,
    project_id: i64,
    who: &str,
    now: i64,
    skip: &[i64],
) -> std::result::Result<Option<Lock>, DbErr> {
    let row = db
        .query_one(sql(
            db,
            &format!(
                "SELECT l.item_id, l.expires_at_ms FROM annotation_locks l \
                 WHERE l.annotator = $1 AND l.project_id = $2 AND l.expires_at_ms > $3 \
                   AND NOT EXISTS (SELECT 1 FROM annotation_annotations a \
                                   WHERE a.item_id = l.item_id AND a.annotator = $1){} \
                 ORDER BY l.acquired_at_ms, l.item_id LIMIT 1",
                not_in("l.item_id", skip)
            ),
            vec![who.into(), project_id.into(), now.into()],
        ))
        .await?;
    row.map(|r| {
        Ok(Lock {
            item_id: col_i64(&r, "item_id")?,
            annotator: who.to_owned(),
            expires_at_ms: col_i64(&r, "expires_at_ms")?,
            new: false,
        })
    })
    .transpose()
}

/// Claim the next item of `project` for `who` (N1): the caller's live lock if they hold one,
/// else the first item in queue order with a free slot. Items in `skip` (those the caller
/// skipped) are passed over, the caller's locks on them included. `None` when nothing is left
/// for them.
pub async fn next_task(
    db: &DatabaseConnection,
    project: &project_e::Model,
    who: &str,
    skip: &[i64],
) -> Result<Option<Claim>> {
    let now = now_ms();
    if let Some(lock) = live_lock(db, project.id, who, now, skip).await? {
        let item = item(db, lock.item_id).await?;
        return Ok(Some(Claim { item, lock }));
    }
    let expires = now.saturating_add(project.lock_ttl_ms);
    let lock = if is_postgres(db) {
        claim_postgres(db, project, who, now, expires, skip).await?
    } else {
        claim_sqlite(db, project, who, now, expires, skip).await?
    };
    match lock {
        Some((lock, Some(item))) => Ok(Some(Claim { item, lock })),
        Some((lock, None)) => {
            let item = item(db, lock.item_id).await?;
            Ok(Some(Claim { item, lock }))
        }
        None => Ok(None),
    }
}

/// Attempts before answering "empty" when every candidate lost its re-count to a racing
/// claimer (each attempt sees the winners' locks, so this is only reached under a storm).
const CLAIM_ATTEMPTS: usize = 8;

async fn claim_postgres(
    db: &DatabaseConnection,
    p: &project_e::Model,
    who: &str,
    now: i64,
    expires: i64,
    skip: &[i64],
) -> Result<Option<(Lock, Option<item_e::Model>)>> {
    let candidates = candidates(skip);
    for _ in 0..CLAIM_ATTEMPTS {
        let tx = db.begin().await?;
        let pick = tx
            .query_one(sql(
                &tx,
                // The whole row: the answer needs it, and it saves a read after the commit.
                &format!("SELECT i.* {candidates} LIMIT 1 FOR UPDATE OF i SKIP LOCKED"),
                vec![p.id.into(), who.into(), now.into(), p.overlap.into()],
            ))
            .await?;
        let Some(pick) = pick else {
            tx.commit().await?;
            return Ok(None);
        };
        let picked = <item_e::Model as sea_orm::FromQueryResult>::from_query_result(&pick, "")?;
        let item_id = picked.id;
        let row = tx
            .query_one(lock_statement(&tx, item_id, p, who, now, expires, false))
            .await?;
        if let Some(row) = row {
            let lock = lock_from(&row, item_id, who, now)?;
            tx.commit().await?;
            return Ok(Some((lock, Some(picked))));
        }
        tx.rollback().await?;
    }
    Ok(None)
}

async fn claim_sqlite(
    db: &DatabaseConnection,
    p: &project_e::Model,
    who: &str,
    now: i64,
    expires: i64,
    skip: &[i64],
) -> Result<Option<(Lock, Option<item_e::Model>)>> {
    let candidates = candidates(skip);
    let row = db
        .query_one(sql(
            db,
            &format!(
                "INSERT INTO annotation_locks \
                   (item_id, annotator, project_id, expires_at_ms, acquired_at_ms) \
                 SELECT i.id, $2, $1, $5, $3 {candidates} LIMIT 1 \
                 ON CONFLICT (item_id, annotator) DO UPDATE SET \
                   expires_at_ms = excluded.expires_at_ms, \
                   acquired_at_ms = excluded.acquired_at_ms \
                 RETURNING item_id, expires_at_ms, acquired_at_ms"
            ),
            vec![
                p.id.into(),
                who.into(),
                now.into(),
                p.overlap.into(),
                expires.into(),
            ],
        ))
        .await?;
    row.map(|r| Ok((lock_from(&r, col_i64(&r, "item_id")?, who, now)?, None)))
        .transpose()
}

fn lock_statement(
    db: &impl ConnectionTrait,
    item_id: i64,
    p: &project_e::Model,
    who: &str,
    now: i64,
    expires: i64,
    correction: bool,
) -> sea_orm::Statement {
    sql(
        db,
        LOCK_WITH_CHECK,
        vec![
            item_id.into(),
            who.into(),
            p.id.into(),
            expires.into(),
            now.into(),
            p.overlap.into(),
            Value::Bool(Some(correction)),
        ],
    )
}

async fn has_annotated(
    db: &impl ConnectionTrait,
    item_id: i64,
    who: &str,
) -> std::result::Result<bool, DbErr> {
    Ok(db
        .query_one(sql(
            db,
            "SELECT 1 AS x FROM annotation_annotations WHERE item_id = $1 AND annotator = $2 LIMIT 1",
            vec![item_id.into(), who.into()],
        ))
        .await?
        .is_some())
}

/// Take or extend (heartbeat) `who`'s lock on an item (N2). An item the caller labeled
/// already can always be locked again, to correct it; otherwise a slot must be free.
pub async fn lock(db: &DatabaseConnection, item_id: i64, who: &str) -> Result<Lock> {
    let it = item(db, item_id).await?;
    let p = project(db, it.project_id).await?;
    let now = now_ms();
    let expires = now.saturating_add(p.lock_ttl_ms);
    let correction = has_annotated(db, item_id, who).await?;
    let row = if is_postgres(db) {
        let tx = db.begin().await?;
        tx.execute(sql(
            &tx,
            "SELECT id FROM annotation_items WHERE id = $1 FOR UPDATE",
            vec![item_id.into()],
        ))
        .await?;
        let row = tx
            .query_one(lock_statement(
                &tx, item_id, &p, who, now, expires, correction,
            ))
            .await?;
        tx.commit().await?;
        row
    } else {
        db.query_one(lock_statement(
            db, item_id, &p, who, now, expires, correction,
        ))
        .await?
    };
    match row {
        Some(r) => Ok(lock_from(&r, item_id, who, now)?),
        None => {
            let fresh = item(db, item_id).await?;
            Err(
                if fresh.done || i64::from(fresh.annotation_count) >= i64::from(p.overlap) {
                    StoreError::conflict(
                        ConflictReason::OverlapReached,
                        format!("item {item_id} has all {} annotations it wants", p.overlap),
                    )
                } else {
                    StoreError::conflict(
                        ConflictReason::LockedByOthers,
                        format!("every free slot of item {item_id} is locked by other annotators"),
                    )
                },
            )
        }
    }
}

/// Release `who`'s lock on an item; true if there was one.
pub async fn release(db: &DatabaseConnection, item_id: i64, who: &str) -> Result<bool> {
    let res = db
        .execute(sql(
            db,
            "DELETE FROM annotation_locks WHERE item_id = $1 AND annotator = $2",
            vec![item_id.into(), who.into()],
        ))
        .await?;
    Ok(res.rows_affected() > 0)
}

/// A validated submit.
#[derive(Debug, Clone)]
pub struct Submit {
    pub item_id: i64,
    pub labels: Vec<String>,
    pub request_id: String,
    pub supersedes: Option<i64>,
    pub lead_time_ms: Option<i64>,
}

/// What a submit produced.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub annotation: annotation::Model,
    /// A retry of a request already stored: `annotation` is the first result.
    pub replay: bool,
}

async fn by_request(
    db: &impl ConnectionTrait,
    who: &str,
    request_id: &str,
) -> std::result::Result<Option<annotation::Model>, DbErr> {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    annotation::Entity::find()
        .filter(annotation::Column::Annotator.eq(who))
        .filter(annotation::Column::RequestId.eq(request_id))
        .one(db)
        .await
}

/// `YYYY-MM-DD` of a Unix-milliseconds time, in UTC.
fn utc_day(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

/// The project of an item, in one query (404 naming the item).
async fn project_of_item(db: &impl ConnectionTrait, item_id: i64) -> Result<project_e::Model> {
    let row = db
        .query_one(sql(
            db,
            "SELECT p.* FROM annotation_projects p \
             JOIN annotation_items i ON i.project_id = p.id WHERE i.id = $1",
            vec![item_id.into()],
        ))
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no item {item_id}")))?;
    Ok(<project_e::Model as sea_orm::FromQueryResult>::from_query_result(&row, "")?)
}

/// Check labels against the project's schema.
pub fn check_labels(p: &project_e::Model, labels: &[String]) -> Result<()> {
    let classes = labels_of(p);
    if labels.is_empty() {
        return Err(StoreError::invalid(
            "labels",
            "at least one label is required",
        ));
    }
    if !p.multi_label && labels.len() != 1 {
        return Err(StoreError::invalid(
            "labels",
            format!("project {} takes exactly one label", p.id),
        ));
    }
    for (i, l) in labels.iter().enumerate() {
        if !classes.contains(l) {
            return Err(StoreError::invalid(
                "labels",
                format!(
                    "{l:?} is not a label of project {} (labels: {})",
                    p.id,
                    classes.join(", ")
                ),
            ));
        }
        if labels[..i].contains(l) {
            return Err(StoreError::invalid(
                "labels",
                format!("{l:?} is given twice"),
            ));
        }
    }
    Ok(())
}

/// Store an annotation (N3): needs the caller's live lock on the item, appends a record
/// (never updates one), releases the lock and counts it, all in one transaction. A retry with
/// the same `request_id` returns the first record.
pub async fn submit(db: &DatabaseConnection, who: &str, s: Submit) -> Result<Submitted> {
    // The common path is nine round trips: the project, then the transaction. A retried
    // request is recognised where it fails (no lock any more, or the request's unique key), so
    // the first submit does not pay for looking it up.
    let p = project_of_item(db, s.item_id).await?;
    check_labels(&p, &s.labels)?;
    let now = now_ms();
    let tx = db.begin().await?;
    // First statement of the transaction is a write: on SQLite it takes the write lock before
    // anything is read, so the transaction cannot fail later on a stale read snapshot.
    let lock = tx
        .query_one(sql(
            &tx,
            "DELETE FROM annotation_locks WHERE item_id = $1 AND annotator = $2 \
             RETURNING expires_at_ms",
            vec![s.item_id.into(), who.into()],
        ))
        .await?;
    let Some(lock) = lock else {
        tx.rollback().await?;
        if let Some(first) = by_request(db, who, &s.request_id).await? {
            return Ok(Submitted {
                annotation: first,
                replay: true,
            });
        }
        return Err(StoreError::conflict(
            ConflictReason::NoLock,
            format!(
                "you hold no lock on item {}; claim or lock it first",
                s.item_id
            ),
        ));
    };
    if col_i64(&lock, "expires_at_ms")? <= now {
        tx.rollback().await?;
        if let Some(first) = by_request(db, who, &s.request_id).await? {
            return Ok(Submitted {
                annotation: first,
                replay: true,
            });
        }
        return Err(StoreError::conflict(
            ConflictReason::LockExpired,
            format!("your lock on item {} expired; lock it again", s.item_id),
        ));
    }
    let previous = match s.supersedes {
        Some(old) => {
            let prev = super::annotation(&tx, old).await;
            let prev = match prev {
                Ok(a) if a.item_id == s.item_id && a.annotator == who => a,
                Ok(_) | Err(StoreError::NotFound(_)) => {
                    tx.rollback().await?;
                    return Err(StoreError::invalid(
                        "supersedes",
                        format!("annotation {old} is not yours on item {}", s.item_id),
                    ));
                }
                Err(e) => return Err(e),
            };
            Some(prev)
        }
        // A second plain record of the caller's on this item is refused by the unique index
        // `annotation_annotations_first` at the insert below.
        None => None,
    };
    let labels_json = serde_json::to_string(&s.labels).unwrap_or_else(|_| "[]".into());
    let inserted = tx
        .query_one(sql(
            &tx,
            "INSERT INTO annotation_annotations \
               (project_id, item_id, annotator, labels, supersedes, request_id, lead_time_ms, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             RETURNING id, project_id, item_id, annotator, labels, supersedes, request_id, \
               lead_time_ms, created_at_ms",
            vec![
                p.id.into(),
                s.item_id.into(),
                who.into(),
                labels_json.into(),
                s.supersedes.into(),
                s.request_id.clone().into(),
                s.lead_time_ms.into(),
                now.into(),
            ],
        ))
        .await;
    let stored = match inserted {
        Ok(Some(row)) => {
            <annotation::Model as sea_orm::FromQueryResult>::from_query_result(&row, "")?
        }
        Ok(None) => return Err(DbErr::RecordNotInserted.into()),
        Err(e) => {
            let unique = matches!(
                e.sql_err(),
                Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
            );
            tx.rollback().await?;
            if unique {
                // A racing retry of the same request won, or a racing correction of the same record.
                if let Some(first) = by_request(db, who, &s.request_id).await? {
                    return Ok(Submitted {
                        annotation: first,
                        replay: true,
                    });
                }
                if s.supersedes.is_none() {
                    return Err(StoreError::conflict(
                        ConflictReason::AlreadyAnnotated,
                        format!(
                            "you labeled item {} already; send a correction with `supersedes`",
                            s.item_id
                        ),
                    ));
                }
                return Err(StoreError::conflict(
                    ConflictReason::AlreadySuperseded,
                    format!(
                        "annotation {} was corrected already; correct the newest record",
                        s.supersedes.unwrap_or_default()
                    ),
                ));
            }
            return Err(e.into());
        }
    };
    match &previous {
        None if is_postgres(&tx) => {
            // One statement for the item and the three counters (PostgreSQL runs
            // data-modifying CTEs; SQLite takes the statements below one by one).
            tx.execute(sql(
                &tx,
                "WITH it AS ( \
                   UPDATE annotation_items SET annotation_count = annotation_count + 1, \
                     done = (annotation_count + 1 >= $2) \
                   WHERE id = $1 RETURNING done), \
                 c AS ( \
                   INSERT INTO annotation_counts (project_id, shard, items, completed, annotations) \
                   SELECT $3, $4, 0, CASE WHEN it.done THEN 1 ELSE 0 END, 1 FROM it \
                   ON CONFLICT (project_id, shard) DO UPDATE SET \
                     completed = annotation_counts.completed + excluded.completed, \
                     annotations = annotation_counts.annotations + excluded.annotations), \
                 l AS ( \
                   INSERT INTO annotation_label_counts (project_id, label, shard, count) \
                   SELECT $3, value, $4, 1 FROM json_array_elements_text(CAST($5 AS json)) \
                   ON CONFLICT (project_id, label, shard) DO UPDATE SET \
                     count = annotation_label_counts.count + excluded.count) \
                 INSERT INTO annotation_daily (project_id, annotator, day, submitted) \
                 VALUES ($3, $6, $7, 1) ON CONFLICT (project_id, day, annotator) \
                 DO UPDATE SET submitted = annotation_daily.submitted + 1",
                vec![
                    s.item_id.into(),
                    p.overlap.into(),
                    p.id.into(),
                    super::shard().into(),
                    stored.labels.clone().into(),
                    who.into(),
                    utc_day(now).into(),
                ],
            ))
            .await?;
        }
        None => {
            let row = tx
                .query_one(sql(
                    &tx,
                    "UPDATE annotation_items SET annotation_count = annotation_count + 1, \
                       done = (annotation_count + 1 >= $2) \
                     WHERE id = $1 RETURNING done",
                    vec![s.item_id.into(), p.overlap.into()],
                ))
                .await?;
            let done = row
                .map(|r| r.try_get::<bool>("", "done"))
                .transpose()?
                .unwrap_or(false);
            add_counts(&tx, p.id, 0, i64::from(done), 1).await?;
            add_label_counts(&tx, p.id, &s.labels, 1).await?;
            let day = utc_day(now);
            tx.execute(sql(
                &tx,
                "INSERT INTO annotation_daily (project_id, annotator, day, submitted) \
                 VALUES ($1, $2, $3, 1) ON CONFLICT (project_id, day, annotator) \
                 DO UPDATE SET submitted = annotation_daily.submitted + 1",
                vec![p.id.into(), who.into(), day.into()],
            ))
            .await?;
        }
        Some(prev) => {
            let old: Vec<String> = serde_json::from_str(&prev.labels).unwrap_or_default();
            add_label_counts(&tx, p.id, &old, -1).await?;
            add_label_counts(&tx, p.id, &s.labels, 1).await?;
        }
    }
    tx.commit().await?;
    Ok(Submitted {
        annotation: stored,
        replay: false,
    })
}

/// Remove locks that lapsed before `now` (the janitor; correctness never waits for it).
/// Returns how many it removed: locks that expired unsubmitted.
pub async fn sweep_expired(db: &DatabaseConnection, now: i64) -> Result<u64> {
    let res = db
        .execute(sql(
            db,
            "DELETE FROM annotation_locks WHERE expires_at_ms <= $1",
            vec![now.into()],
        ))
        .await?;
    Ok(res.rows_affected())
}
