//! Export jobs (N9): a request stores a pending job; a worker claims it atomically, writes
//! `<export_dir>/<id>.<ext>` through a temporary file, records its sha256 and manifest.
//!
//! * Claim: one `UPDATE ... WHERE id = (first claimable) AND <still claimable> RETURNING`, with
//!   `FOR UPDATE SKIP LOCKED` in the subquery on PostgreSQL; on SQLite the one statement is
//!   atomic. Claimable: `pending`, or `running` for longer than `export_stale_after` (its worker
//!   crashed). Two workers never run one job at the same time within that bound.
//! * Fencing: a claim's `started_at_ms` is its token. Progress and the final write are
//!   `UPDATE ... WHERE state = 'running' AND started_at_ms = <token>`: a worker whose job was
//!   claimed again stops at its next chunk. Each claim writes its own temporary file
//!   (`<id>.<ext>.<token>.tmp`), so two of them never write into one file; the rename to
//!   `<id>.<ext>` is atomic, and the bytes are the same whoever renames last (determinism).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, EntityTrait};
use tokio_util::sync::CancellationToken;

use crate::AnnotationShared;
use crate::dataset::{self, DatasetError, DatasetSpec, Format, Manifest, Progress};
use crate::entity::export;
use crate::store::{self, col_i64, is_postgres, sql};

/// An export job's state.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
#[schema(as = ExportState)]
pub enum State {
    Pending,
    Running,
    Done,
    Failed,
}

impl State {
    pub fn parse(s: &str) -> Self {
        match s {
            "running" => Self::Running,
            "done" => Self::Done,
            "failed" => Self::Failed,
            _ => Self::Pending,
        }
    }
}

/// The outcomes `bulwark_annotation_exports_total` counts.
pub const OUTCOMES: [&str; 2] = ["done", "failed"];

/// The data file of job `id`, relative to the export directory.
pub fn file_name(id: i64, format: Format) -> String {
    format!("{id}.{}", format.ext())
}

/// Store a pending job for `spec` (already validated and resolved).
pub async fn create(
    db: &DatabaseConnection,
    spec: &DatasetSpec,
    created_by: &str,
) -> Result<export::Model, DatasetError> {
    let text = serde_json::to_string(spec)?;
    let row = db
        .query_one(sql(
            db,
            "INSERT INTO annotation_exports \
               (project_id, spec, format, state, rows_done, created_by, created_at_ms) \
             VALUES ($1, $2, $3, 'pending', 0, $4, $5) RETURNING id",
            vec![
                spec.project.into(),
                text.into(),
                spec.format.as_str().into(),
                created_by.into(),
                store::now_ms().into(),
            ],
        ))
        .await?
        .ok_or(DbErr::RecordNotInserted)?;
    let id = col_i64(&row, "id")?;
    get(db, id)
        .await?
        .ok_or_else(|| DatasetError::NotFound(format!("no export {id}")))
}

pub async fn get(db: &DatabaseConnection, id: i64) -> Result<Option<export::Model>, DbErr> {
    export::Entity::find_by_id(id).one(db).await
}

/// A claimed job: the row and the claim's token.
#[derive(Debug, Clone)]
pub struct Claim {
    pub job: export::Model,
    pub token: i64,
}

/// Claim the first pending (or stale running) job, if any.
pub async fn claim(
    db: &DatabaseConnection,
    now: i64,
    stale_after: Duration,
) -> Result<Option<Claim>, DbErr> {
    let stale_before = now - i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX);
    let claimable = "(state = 'pending' OR (state = 'running' AND started_at_ms < $2))";
    let lock = if is_postgres(db) {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let text = format!(
        "UPDATE annotation_exports SET state = 'running', started_at_ms = $1, rows_done = 0, \
           error = NULL, finished_at_ms = NULL \
         WHERE id = (SELECT id FROM annotation_exports WHERE {claimable} ORDER BY id LIMIT 1{lock}) \
           AND {claimable} \
         RETURNING id"
    );
    let Some(row) = db
        .query_one(sql(db, &text, vec![now.into(), stale_before.into()]))
        .await?
    else {
        return Ok(None);
    };
    let id = col_i64(&row, "id")?;
    Ok(get(db, id).await?.map(|job| Claim { job, token: now }))
}

/// Fenced progress: false when the claim was lost.
async fn progress(db: &DatabaseConnection, c: &Claim, rows_done: u64) -> Result<bool, DbErr> {
    let res = db
        .execute(sql(
            db,
            "UPDATE annotation_exports SET rows_done = $3 \
             WHERE id = $1 AND state = 'running' AND started_at_ms = $2",
            vec![
                c.job.id.into(),
                c.token.into(),
                i64::try_from(rows_done).unwrap_or(i64::MAX).into(),
            ],
        ))
        .await?;
    Ok(res.rows_affected() == 1)
}

/// Fenced end of a job: `done` with its file, or `failed` with the error.
async fn finish(
    db: &DatabaseConnection,
    c: &Claim,
    outcome: Result<(&Manifest, &str), &str>,
) -> Result<bool, DbErr> {
    let now = store::now_ms();
    let stmt = match outcome {
        Ok((m, path)) => sql(
            db,
            "UPDATE annotation_exports SET state = 'done', rows_done = $3, rows_total = $3, \
               path = $4, sha256 = $5, manifest = $6, finished_at_ms = $7 \
             WHERE id = $1 AND state = 'running' AND started_at_ms = $2",
            vec![
                c.job.id.into(),
                c.token.into(),
                i64::try_from(m.counts.rows).unwrap_or(i64::MAX).into(),
                path.into(),
                m.file.sha256.clone().into(),
                serde_json::to_string(m).unwrap_or_default().into(),
                now.into(),
            ],
        ),
        Err(error) => sql(
            db,
            "UPDATE annotation_exports SET state = 'failed', error = $3, finished_at_ms = $4 \
             WHERE id = $1 AND state = 'running' AND started_at_ms = $2",
            vec![c.job.id.into(), c.token.into(), error.into(), now.into()],
        ),
    };
    Ok(db.execute(stmt).await?.rows_affected() == 1)
}

/// Put a job a stopping worker had claimed back to `pending` (fenced).
async fn release(db: &DatabaseConnection, c: &Claim) -> Result<(), DbErr> {
    db.execute(sql(
        db,
        "UPDATE annotation_exports SET state = 'pending', started_at_ms = NULL, rows_done = 0 \
         WHERE id = $1 AND state = 'running' AND started_at_ms = $2",
        vec![c.job.id.into(), c.token.into()],
    ))
    .await?;
    Ok(())
}

/// An estimate of the rows a spec gives, from the project's counters (no COUNT(*)): current
/// annotations, or items when consolidated. Exact once the job is done.
pub async fn estimate_rows(
    db: &impl ConnectionTrait,
    spec: &DatasetSpec,
) -> Result<Option<i64>, DbErr> {
    let row = db
        .query_one(sql(
            db,
            "SELECT CAST(COALESCE(SUM(items), 0) AS BIGINT) AS items, \
                    CAST(COALESCE(SUM(annotations), 0) AS BIGINT) AS annotations \
             FROM annotation_counts WHERE project_id = $1",
            vec![spec.project.into()],
        ))
        .await?;
    let Some(row) = row else { return Ok(None) };
    let col = if spec.consolidation.is_some() {
        "items"
    } else {
        "annotations"
    };
    Ok(Some(col_i64(&row, col)?))
}

struct JobProgress<'a> {
    db: &'a DatabaseConnection,
    claim: &'a Claim,
    stop: &'a CancellationToken,
}

impl Progress for JobProgress<'_> {
    async fn chunk_done(&mut self, rows: u64) -> Result<(), DatasetError> {
        if self.stop.is_cancelled() {
            return Err(DatasetError::Stopped("shutting down".into()));
        }
        if !progress(self.db, self.claim, rows).await? {
            return Err(DatasetError::Stopped(
                "the job was claimed by another worker".into(),
            ));
        }
        Ok(())
    }
}

/// Produce a claimed job's file and manifest.
async fn produce(
    db: &DatabaseConnection,
    dir: &Path,
    c: &Claim,
    stop: &CancellationToken,
) -> Result<(Manifest, String), DatasetError> {
    let spec: DatasetSpec = serde_json::from_str(&c.job.spec)?;
    let project = store::project(db, spec.project).await?;
    if let Some(total) = estimate_rows(db, &spec).await? {
        db.execute(sql(
            db,
            "UPDATE annotation_exports SET rows_total = $3 \
             WHERE id = $1 AND state = 'running' AND started_at_ms = $2",
            vec![c.job.id.into(), c.token.into(), total.into()],
        ))
        .await?;
    }
    let name = file_name(c.job.id, spec.format);
    let path = dir.join(&name);
    let tmp: PathBuf = dir.join(format!("{name}.{}.tmp", c.token));
    let mut p = JobProgress { db, claim: c, stop };
    let g = dataset::write_file(db, &project, &spec, &path, Some(&tmp), &mut p).await?;
    let download = format!(
        "{}-{}.{}",
        dataset::safe_name(&project.name),
        c.job.id,
        spec.format.ext()
    );
    let manifest = Manifest::new(spec, &project, download, &g);
    Ok((manifest, name))
}

/// Run one claimed job to its end.
async fn run_job(s: &AnnotationShared, c: Claim, stop: &CancellationToken) {
    let started = Instant::now();
    let format = Format::parse(&c.job.format).unwrap_or(Format::Csv);
    let result = produce(&s.db, &s.export_dir, &c, stop).await;
    let outcome = match &result {
        Ok((m, path)) => finish(&s.db, &c, Ok((m, path)))
            .await
            .map(|ok| (ok, "done")),
        Err(DatasetError::Stopped(why)) => {
            tracing::info!(message = "Export job stopped.", job = c.job.id, reason = %why);
            if stop.is_cancelled() {
                let _ = release(&s.db, &c).await;
            }
            return;
        }
        Err(e) => {
            tracing::warn!(message = "Export job failed.", job = c.job.id, error = %e);
            finish(&s.db, &c, Err(&e.to_string()))
                .await
                .map(|ok| (ok, "failed"))
        }
    };
    match outcome {
        Ok((true, outcome)) => {
            metrics::counter!("bulwark_annotation_exports_total",
                "format" => format.as_str(), "outcome" => outcome)
            .increment(1);
            metrics::histogram!("bulwark_annotation_export_seconds", "format" => format.as_str())
                .record(started.elapsed().as_secs_f64());
            if let Ok((m, _)) = &result {
                tracing::info!(
                    message = "Export job done.",
                    job = c.job.id,
                    rows = m.counts.rows,
                    bytes = m.file.bytes,
                    seconds = started.elapsed().as_secs_f64()
                );
            }
        }
        Ok((false, _)) => {
            tracing::info!(
                message = "Export job was claimed again meanwhile.",
                job = c.job.id
            );
        }
        Err(e) => {
            tracing::warn!(message = "Recording an export job's end failed.", job = c.job.id, error = %e)
        }
    }
}

/// The export worker: claims and runs jobs until none is left, then waits
/// `export_poll_interval`. On shutdown, a job in progress goes back to `pending`.
pub async fn worker(s: Arc<AnnotationShared>, stop: CancellationToken) {
    loop {
        loop {
            if stop.is_cancelled() {
                return;
            }
            match claim(&s.db, store::now_ms(), s.cfg.export_stale_after).await {
                Ok(Some(c)) => run_job(&s, c, &stop).await,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(message = "Claiming an export job failed.", error = %e);
                    break;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(s.cfg.export_poll_interval) => {}
        }
    }
}
