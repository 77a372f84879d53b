//! `bulwark reporting backfill` (R5): reload a captured table's rows for a time range from a
//! **streaming replica** (never the primary), merge them into its warehouse table under the
//! LSN guard, then recompute the reports over that table for the range's days.
//!
//! * **Refuses a primary**: `pg_is_in_recovery()` must be true on the URL it reads.
//! * **Chunks** of a day or a month of the table's time column; each chunk is read in keyset
//!   pages and merged as one Delta commit per page, then recorded in `reporting_backfills`, so a
//!   killed backfill resumes after its last finished chunk (a page merged twice is harmless).
//! * **Newer CDC data wins**: backfilled rows carry `_lsn` 0 (like a snapshot) and a `_seq` of
//!   the backfill's start time, so they replace snapshot and older backfill rows but never a
//!   row the capture streamed (`_lsn` > 0), nor its tombstone.
//! * The merge reads the chunk's Arrow batch directly: staging it as a Parquet file or a staging
//!   Delta table first would write every row twice for no gain in safety, since a chunk is only
//!   recorded done after its merge committed.

use std::collections::BTreeSet;

use chrono::{Datelike, Months, NaiveDate};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, Value as DbValue};
use thiserror::Error;

use bulwark_pipeline::data::Engine;

use crate::capture::{self, SourceTable, quote};
use crate::config::ReportingConfig;
use crate::event::{Batch, Change, Op};
use crate::sink;
use crate::summary::{self, Scope};

#[derive(Debug, Error)]
pub enum BackfillError {
    /// Bad input: the message names the flag or config key.
    #[error("{0}")]
    Invalid(String),
    #[error("replica: {0}")]
    Source(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    #[error("warehouse: {0}")]
    Sink(#[from] sink::SinkError),
    #[error("summary: {0}")]
    Summary(#[from] summary::SummaryError),
    #[error("bulwark database: {0}")]
    State(sea_orm::DbErr),
}

type Result<T> = std::result::Result<T, BackfillError>;

/// Chunk size of a backfill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    Day,
    Month,
}

/// What to backfill.
#[derive(Debug, Clone)]
pub struct Request {
    /// `schema.table` or `table`, as listed in `[[reporting.tables]]`.
    pub table: String,
    pub from: NaiveDate,
    /// Inclusive.
    pub to: NaiveDate,
    pub chunk: Chunk,
    /// Overrides the table's `time_column`.
    pub column: Option<String>,
}

/// What a backfill did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub chunks: usize,
    pub chunks_skipped: usize,
    pub rows: u64,
    pub reports_refreshed: Vec<String>,
}

/// `[a, b)` chunks covering `from..=to`.
pub fn chunks(from: NaiveDate, to: NaiveDate, chunk: Chunk) -> Vec<(NaiveDate, NaiveDate)> {
    let mut out = Vec::new();
    let end = to.succ_opt().unwrap_or(to);
    let mut a = from;
    while a < end {
        let next = match chunk {
            Chunk::Day => a.succ_opt().unwrap_or(end),
            Chunk::Month => a
                .with_day(1)
                .and_then(|f| f.checked_add_months(Months::new(1)))
                .unwrap_or(end),
        };
        let b = next.min(end);
        out.push((a, b));
        a = b;
    }
    out
}

/// Is `db` a replica? A primary is refused with a message naming the setting.
pub async fn require_replica(db: &DatabaseConnection) -> Result<()> {
    let row = db
        .query_one(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pg_is_in_recovery()",
        ))
        .await?;
    let standby = row
        .and_then(|r| r.try_get_by_index::<bool>(0).ok())
        .unwrap_or(false);
    if !standby {
        return Err(BackfillError::Invalid(
            "reporting.replica_url (--replica-url) is a primary: pg_is_in_recovery() is false \
             there. A backfill reads only from a streaming replica, so that it never loads the \
             production database; point it at a standby"
                .into(),
        ));
    }
    Ok(())
}

/// The SQL literal bounds of a chunk for a column of type `ty` (`format_type` text).
fn bounds(ty: &str, a: NaiveDate, b: NaiveDate) -> Result<(String, String)> {
    let ms = |d: NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
            .unwrap_or(0)
    };
    match ty {
        "bigint" => Ok((ms(a).to_string(), ms(b).to_string())),
        t if t.starts_with("timestamp") || t == "date" => {
            Ok((format!("CAST('{a}' AS {t})"), format!("CAST('{b}' AS {t})")))
        }
        other => Err(BackfillError::Invalid(format!(
            "--column: the time column is of type `{other}`; a backfill range needs a date, a \
             timestamp, or Unix milliseconds in a bigint"
        ))),
    }
}

fn state_stmt(db: &DatabaseConnection, sql: &str, values: Vec<DbValue>) -> Statement {
    Statement::from_sql_and_values(db.get_database_backend(), sql, values)
}

/// Run a backfill. `progress(done, total)` is called after each chunk.
pub async fn run(
    cfg: &ReportingConfig,
    replica: &DatabaseConnection,
    state: &DatabaseConnection,
    engine: &Engine,
    req: &Request,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Outcome> {
    let (i, tcfg) = cfg
        .tables
        .iter()
        .enumerate()
        .find(|(_, t)| t.full_name() == req.table || t.name == req.table)
        .ok_or_else(|| {
            BackfillError::Invalid(format!(
                "--table: `{}` is not a captured table ([[reporting.tables]] lists: {})",
                req.table,
                cfg.tables
                    .iter()
                    .map(|t| t.full_name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    if req.from > req.to {
        return Err(BackfillError::Invalid(format!(
            "--to ({}) is before --from ({})",
            req.to, req.from
        )));
    }
    let column = req
        .column
        .clone()
        .or_else(|| tcfg.time_column.clone())
        .ok_or_else(|| {
            BackfillError::Invalid(format!(
                "--column: no time column for `{}`: pass --column or set `time_column` in its \
                 [[reporting.tables]] entry",
                tcfg.full_name()
            ))
        })?;
    require_replica(replica).await?;
    let t: SourceTable = capture::describe(replica, tcfg, i, false).await?;
    let ty = t
        .columns
        .iter()
        .find(|(c, _)| c.name == column)
        .map(|(_, ty)| ty.clone())
        .ok_or_else(|| {
            BackfillError::Invalid(format!(
                "--column: `{}` has no column `{column}`",
                t.full_name()
            ))
        })?;
    let target = tcfg.target_table();
    let run_seq = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(1);
    let all = chunks(req.from, req.to, req.chunk);
    let mut out = Outcome::default();
    let mut days = BTreeSet::new();
    for (n, (a, b)) in all.iter().enumerate() {
        let mut d = *a;
        while d < *b {
            days.insert(d.to_string());
            d = d.succ_opt().unwrap_or(*b);
        }
        let done = state
            .query_one(state_stmt(
                state,
                "SELECT rows FROM reporting_backfills WHERE source_table = $1 AND column_name = $2 \
                 AND chunk_start = $3 AND chunk_end = $4",
                vec![
                    t.full_name().into(),
                    column.clone().into(),
                    a.to_string().into(),
                    b.to_string().into(),
                ],
            ))
            .await
            .map_err(BackfillError::State)?
            .is_some();
        if done {
            out.chunks_skipped += 1;
            progress(n + 1, all.len());
            continue;
        }
        let (lo, hi) = bounds(&ty, *a, *b)?;
        let col = quote(&column);
        let range = format!("{col} >= {lo} AND {col} < {hi}");
        let mut last: Option<Vec<Option<String>>> = None;
        let mut rows_chunk = 0u64;
        loop {
            let rows = capture::keyset_page(
                replica,
                &t,
                Some(&range),
                last.as_deref(),
                cfg.snapshot_chunk,
            )
            .await?;
            if rows.is_empty() {
                break;
            }
            let now = chrono::Utc::now().timestamp_micros();
            let n_rows = rows.len();
            let changes: Vec<Change> = rows
                .into_iter()
                .map(|after| Change {
                    op: Op::Read,
                    lsn: 0,
                    seq: run_seq,
                    xid: 0,
                    commit_time_us: now,
                    after,
                    unchanged: vec![],
                    before: None,
                })
                .collect();
            last = changes.last().map(|c| t.key_of(&c.after));
            let batch = Batch {
                table: t.full_name(),
                columns: t.column_types(),
                changes,
            };
            sink::apply(engine, &target, std::slice::from_ref(&batch)).await?;
            rows_chunk += n_rows as u64;
            metrics::counter!("bulwark_reporting_backfill_rows_total", "table" => t.full_name())
                .increment(n_rows as u64);
            if n_rows < cfg.snapshot_chunk as usize {
                break;
            }
        }
        state
            .execute(state_stmt(
                state,
                "INSERT INTO reporting_backfills (source_table, column_name, chunk_start, \
                 chunk_end, rows, done_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
                vec![
                    t.full_name().into(),
                    column.clone().into(),
                    a.to_string().into(),
                    b.to_string().into(),
                    i64::try_from(rows_chunk).unwrap_or(i64::MAX).into(),
                    chrono::Utc::now().timestamp_millis().into(),
                ],
            ))
            .await
            .map_err(BackfillError::State)?;
        out.chunks += 1;
        out.rows += rows_chunk;
        progress(n + 1, all.len());
    }
    // The reports over this table, for the range's days (their watermark stays: changes the
    // capture applied meanwhile are folded in by the next scheduled refresh).
    for (name, r) in &cfg.reports {
        if r.table == target {
            summary::refresh(engine, state, name, r, &Scope::Days(days.clone())).await?;
            out.reports_refreshed.push(name.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date")
    }

    #[test]
    fn chunks_cover_the_range() {
        let days = chunks(d("2026-01-30"), d("2026-02-02"), Chunk::Day);
        assert_eq!(days.len(), 4);
        assert_eq!(days[0], (d("2026-01-30"), d("2026-01-31")));
        assert_eq!(days[3], (d("2026-02-02"), d("2026-02-03")));
        let months = chunks(d("2026-01-15"), d("2026-03-10"), Chunk::Month);
        assert_eq!(
            months,
            vec![
                (d("2026-01-15"), d("2026-02-01")),
                (d("2026-02-01"), d("2026-03-01")),
                (d("2026-03-01"), d("2026-03-11")),
            ]
        );
        assert!(chunks(d("2026-02-02"), d("2026-02-01"), Chunk::Day).is_empty());
    }

    #[test]
    fn bounds_by_column_type() {
        let (a, b) = bounds("bigint", d("2026-11-04"), d("2026-11-05")).expect("bigint");
        assert_eq!((a.as_str(), b.as_str()), ("1793750400000", "1793836800000"));
        let (a, _) = bounds("timestamp with time zone", d("2026-11-04"), d("2026-11-05"))
            .expect("timestamptz");
        assert_eq!(a, "CAST('2026-11-04' AS timestamp with time zone)");
        assert!(bounds("text", d("2026-11-04"), d("2026-11-05")).is_err());
    }
}
