//! The metadata database (P2): every state change of runs and task instances.
//!
//! Each transition is one guarded `UPDATE` whose `WHERE` names the state (and try) it leaves,
//! so a redelivered message, a zombie sweep and a late worker cannot all apply the same
//! change; whoever's update matched a row owns the transition. Readiness is kept as a count
//! (`pending_upstream`): a success decrements its direct downstreams, and the ones reaching
//! zero become `scheduled` in the same transaction, so no query rescans a run (P1).

use std::collections::{BTreeMap, HashMap, HashSet};

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, Statement, TransactionTrait, Value,
};

use crate::entity::{backfill, dag as dag_e, pool, run, task_instance as ti, task_try};

/// Task-instance and run states (docs/pipeline.md "States").
pub mod state {
    pub const NONE: &str = "none";
    pub const SCHEDULED: &str = "scheduled";
    pub const QUEUED: &str = "queued";
    pub const RUNNING: &str = "running";
    pub const SUCCESS: &str = "success";
    pub const FAILED: &str = "failed";
    pub const UP_FOR_RETRY: &str = "up_for_retry";
    pub const UPSTREAM_FAILED: &str = "upstream_failed";
    pub const SKIPPED: &str = "skipped";
    pub const DEFERRED: &str = "deferred";
    /// Every task-instance state, for validating filters.
    pub const ALL: [&str; 10] = [
        NONE,
        SCHEDULED,
        QUEUED,
        RUNNING,
        SUCCESS,
        FAILED,
        UP_FOR_RETRY,
        UPSTREAM_FAILED,
        SKIPPED,
        DEFERRED,
    ];
    /// States a run can be in.
    pub const RUN_ALL: [&str; 4] = [QUEUED, RUNNING, SUCCESS, FAILED];
    /// `IN (...)` text of the states that are not finished.
    pub const UNFINISHED_SQL: &str =
        "('none','scheduled','queued','running','up_for_retry','deferred')";
}

/// Run types.
pub mod run_type {
    pub const SCHEDULED: &str = "scheduled";
    pub const MANUAL: &str = "manual";
    pub const BACKFILL: &str = "backfill";
    pub const DATASET: &str = "dataset";
    pub const ALL: [&str; 4] = [SCHEDULED, MANUAL, BACKFILL, DATASET];
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] DbErr),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl StoreError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
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

/// A statement for `db`'s backend (`$n` placeholders work on both).
pub(crate) fn sql(db: &impl ConnectionTrait, text: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(db.get_database_backend(), text, values)
}

fn col_i64(row: &sea_orm::QueryResult, name: &str) -> std::result::Result<i64, DbErr> {
    row.try_get::<i64>("", name)
}

fn col_str(row: &sea_orm::QueryResult, name: &str) -> std::result::Result<String, DbErr> {
    row.try_get::<String>("", name)
}

/// `(1,2,3)` for an `IN`: integers written into the text (no injection is possible).
fn id_list(ids: &[i64]) -> String {
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("({})", list.join(","))
}

/// `($k,$k+1,...)` placeholders for `n` values starting at `$first`.
fn placeholders(first: usize, n: usize) -> String {
    let list: Vec<String> = (first..first + n).map(|i| format!("${i}")).collect();
    format!("({})", list.join(","))
}

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// DAGs

/// What the scheduler records about one loaded DAG.
#[derive(Debug, Clone)]
pub struct DagRecord {
    pub dag_id: String,
    pub file: Option<String>,
    pub hash: String,
    pub schedule: String,
    pub timezone: String,
    pub start_date_ms: i64,
    pub end_date_ms: Option<i64>,
    pub catchup: bool,
    pub description: String,
    pub owner: String,
    pub tags: Vec<String>,
    pub max_active_runs: i32,
    pub max_active_tasks: i32,
    pub sla_ms: Option<i64>,
    /// JSON of the tasks (see `entity::dag::Model::definition`).
    pub definition: String,
}

/// One problem of a DAG file, as stored for the API.
#[derive(Debug, Clone)]
pub struct ImportError {
    pub file: String,
    pub line: i32,
    pub message: String,
}

/// Make the table say what was just loaded: upsert every DAG (its pause flag is kept), record
/// each new version, mark DAGs no longer loaded inactive, and replace the import errors.
pub async fn sync_dags(
    db: &DatabaseConnection,
    dags: &[DagRecord],
    errors: &[ImportError],
    now: i64,
) -> Result<()> {
    let tx = db.begin().await?;
    for d in dags {
        tx.execute(sql(
            &tx,
            "INSERT INTO pipeline_dags (dag_id, file, hash, schedule, timezone, start_date_ms, \
               end_date_ms, catchup, description, owner, tags, max_active_runs, max_active_tasks, \
               sla_ms, is_paused, is_active, next_logical_ms, definition, updated_at_ms) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,false,true,NULL,$15,$16) \
             ON CONFLICT (dag_id) DO UPDATE SET file = excluded.file, hash = excluded.hash, \
               schedule = excluded.schedule, timezone = excluded.timezone, \
               start_date_ms = excluded.start_date_ms, end_date_ms = excluded.end_date_ms, \
               catchup = excluded.catchup, description = excluded.description, \
               owner = excluded.owner, tags = excluded.tags, \
               max_active_runs = excluded.max_active_runs, \
               max_active_tasks = excluded.max_active_tasks, sla_ms = excluded.sla_ms, \
               is_active = true, definition = excluded.definition, \
               next_logical_ms = CASE WHEN pipeline_dags.schedule = excluded.schedule \
                 AND pipeline_dags.timezone = excluded.timezone \
                 AND pipeline_dags.start_date_ms = excluded.start_date_ms \
                 THEN pipeline_dags.next_logical_ms ELSE NULL END, \
               updated_at_ms = excluded.updated_at_ms \
             WHERE pipeline_dags.hash <> excluded.hash OR NOT pipeline_dags.is_active",
            vec![
                d.dag_id.clone().into(),
                d.file.clone().into(),
                d.hash.clone().into(),
                d.schedule.clone().into(),
                d.timezone.clone().into(),
                d.start_date_ms.into(),
                d.end_date_ms.into(),
                d.catchup.into(),
                d.description.clone().into(),
                d.owner.clone().into(),
                serde_json::to_string(&d.tags).unwrap_or_default().into(),
                d.max_active_runs.into(),
                d.max_active_tasks.into(),
                d.sla_ms.into(),
                d.definition.clone().into(),
                now.into(),
            ],
        ))
        .await?;
        tx.execute(sql(
            &tx,
            "INSERT INTO pipeline_dag_versions (dag_id, hash, definition, created_at_ms) \
             VALUES ($1,$2,$3,$4) ON CONFLICT (dag_id, hash) DO NOTHING",
            vec![
                d.dag_id.clone().into(),
                d.hash.clone().into(),
                d.definition.clone().into(),
                now.into(),
            ],
        ))
        .await?;
    }
    let loaded: Vec<Value> = dags.iter().map(|d| d.dag_id.clone().into()).collect();
    let text = if loaded.is_empty() {
        "UPDATE pipeline_dags SET is_active = false WHERE is_active".to_owned()
    } else {
        format!(
            "UPDATE pipeline_dags SET is_active = false WHERE is_active AND dag_id NOT IN {}",
            placeholders(1, loaded.len())
        )
    };
    tx.execute(sql(&tx, &text, loaded)).await?;
    tx.execute(sql(&tx, "DELETE FROM pipeline_import_errors", vec![]))
        .await?;
    for e in errors {
        tx.execute(sql(
            &tx,
            "INSERT INTO pipeline_import_errors (file, line, message, updated_at_ms) \
             VALUES ($1,$2,$3,$4)",
            vec![
                e.file.clone().into(),
                e.line.into(),
                e.message.clone().into(),
                now.into(),
            ],
        ))
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn import_errors(db: &impl ConnectionTrait) -> Result<Vec<ImportError>> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT file, line, message FROM pipeline_import_errors ORDER BY file, line",
            vec![],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            Ok(ImportError {
                file: col_str(r, "file")?,
                line: r.try_get::<i32>("", "line")?,
                message: col_str(r, "message")?,
            })
        })
        .collect()
}

pub async fn dag(db: &impl ConnectionTrait, dag_id: &str) -> Result<dag_e::Model> {
    dag_e::Entity::find_by_id(dag_id.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no DAG `{dag_id}`")))
}

/// Active DAGs (loaded from a file or registered), by id, after `cursor`.
pub async fn dags(
    db: &impl ConnectionTrait,
    cursor: Option<&str>,
    limit: u64,
    paused: Option<bool>,
) -> Result<Vec<dag_e::Model>> {
    let mut text = "SELECT * FROM pipeline_dags WHERE is_active".to_owned();
    let mut values: Vec<Value> = Vec::new();
    if let Some(c) = cursor {
        values.push(c.to_owned().into());
        text.push_str(&format!(" AND dag_id > ${}", values.len()));
    }
    if let Some(p) = paused {
        values.push(p.into());
        text.push_str(&format!(" AND is_paused = ${}", values.len()));
    }
    text.push_str(&format!(" ORDER BY dag_id LIMIT {limit}"));
    Ok(dag_e::Entity::find()
        .from_raw_sql(sql(db, &text, values))
        .all(db)
        .await?)
}

pub async fn set_paused(db: &impl ConnectionTrait, dag_id: &str, paused: bool) -> Result<()> {
    let r = db
        .execute(sql(
            db,
            "UPDATE pipeline_dags SET is_paused = $2 WHERE dag_id = $1",
            vec![dag_id.into(), paused.into()],
        ))
        .await?;
    if r.rows_affected() == 0 {
        return Err(StoreError::NotFound(format!("no DAG `{dag_id}`")));
    }
    Ok(())
}

pub async fn set_next_logical(db: &impl ConnectionTrait, dag_id: &str, next: i64) -> Result<()> {
    db.execute(sql(
        db,
        "UPDATE pipeline_dags SET next_logical_ms = $2 WHERE dag_id = $1",
        vec![dag_id.into(), next.into()],
    ))
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Runs

/// A run to create.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub dag_id: String,
    pub run_id: String,
    pub logical_date_ms: i64,
    pub interval_start_ms: i64,
    pub interval_end_ms: i64,
    pub run_type: &'static str,
    pub conf: serde_json::Value,
    pub backfill_id: Option<i64>,
}

/// Insert runs as `queued`; a logical date (or run id) that already has a run is left alone.
/// Returns how many were inserted.
pub async fn insert_runs(db: &impl ConnectionTrait, runs: &[NewRun], now: i64) -> Result<u64> {
    let mut inserted = 0;
    for chunk in runs.chunks(400) {
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 9);
        let mut rows = Vec::with_capacity(chunk.len());
        for r in chunk {
            let first = values.len() + 1;
            rows.push(format!(
                "(${},${},${},${},${},${},'queued',${},${},${})",
                first,
                first + 1,
                first + 2,
                first + 3,
                first + 4,
                first + 5,
                first + 6,
                first + 7,
                first + 8
            ));
            values.extend([
                r.dag_id.clone().into(),
                r.run_id.clone().into(),
                r.logical_date_ms.into(),
                r.interval_start_ms.into(),
                r.interval_end_ms.into(),
                r.run_type.into(),
                r.conf.to_string().into(),
                r.backfill_id.into(),
                now.into(),
            ]);
        }
        let text = format!(
            "INSERT INTO pipeline_runs (dag_id, run_id, logical_date_ms, interval_start_ms, \
               interval_end_ms, run_type, state, conf, backfill_id, queued_at_ms) VALUES {} \
             ON CONFLICT DO NOTHING",
            rows.join(",")
        );
        inserted += db.execute(sql(db, &text, values)).await?.rows_affected();
    }
    Ok(inserted)
}

/// Create one run (a manual trigger or a dataset event); 409 when its logical date or run id
/// already has one.
pub async fn create_run(db: &impl ConnectionTrait, new: NewRun, now: i64) -> Result<run::Model> {
    if insert_runs(db, std::slice::from_ref(&new), now).await? == 0 {
        return Err(StoreError::Conflict(format!(
            "DAG `{}` already has a run for this logical date or run id `{}`",
            new.dag_id, new.run_id
        )));
    }
    run_by_id(db, &new.dag_id, &new.run_id).await
}

pub async fn run_by_id(
    db: &impl ConnectionTrait,
    dag_id: &str,
    run_id: &str,
) -> Result<run::Model> {
    run::Entity::find()
        .from_raw_sql(sql(
            db,
            "SELECT * FROM pipeline_runs WHERE dag_id = $1 AND run_id = $2",
            vec![dag_id.into(), run_id.into()],
        ))
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("DAG `{dag_id}` has no run `{run_id}`")))
}

/// Filters of a run listing.
#[derive(Debug, Default, Clone)]
pub struct RunFilter {
    pub state: Option<String>,
    pub run_type: Option<String>,
    pub logical_gte: Option<i64>,
    pub logical_lte: Option<i64>,
    /// Keyset: runs with a logical date before this one (newest first).
    pub before_logical: Option<i64>,
    pub backfill_id: Option<i64>,
}

pub async fn runs(
    db: &impl ConnectionTrait,
    dag_id: &str,
    f: &RunFilter,
    limit: u64,
) -> Result<Vec<run::Model>> {
    let mut text = "SELECT * FROM pipeline_runs WHERE dag_id = $1".to_owned();
    let mut values: Vec<Value> = vec![dag_id.into()];
    let push = |cond: &str, v: Value, values: &mut Vec<Value>, text: &mut String| {
        values.push(v);
        text.push_str(&format!(" AND {cond} ${}", values.len()));
    };
    if let Some(s) = &f.state {
        push("state =", s.clone().into(), &mut values, &mut text);
    }
    if let Some(s) = &f.run_type {
        push("run_type =", s.clone().into(), &mut values, &mut text);
    }
    if let Some(v) = f.logical_gte {
        push("logical_date_ms >=", v.into(), &mut values, &mut text);
    }
    if let Some(v) = f.logical_lte {
        push("logical_date_ms <=", v.into(), &mut values, &mut text);
    }
    if let Some(v) = f.before_logical {
        push("logical_date_ms <", v.into(), &mut values, &mut text);
    }
    if let Some(v) = f.backfill_id {
        push("backfill_id =", v.into(), &mut values, &mut text);
    }
    text.push_str(&format!(" ORDER BY logical_date_ms DESC LIMIT {limit}"));
    Ok(run::Entity::find()
        .from_raw_sql(sql(db, &text, values))
        .all(db)
        .await?)
}

/// The latest run of each DAG in `dag_ids`.
pub async fn last_runs(
    db: &impl ConnectionTrait,
    dag_ids: &[String],
) -> Result<HashMap<String, run::Model>> {
    if dag_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let values: Vec<Value> = dag_ids.iter().map(|d| d.clone().into()).collect();
    let text = format!(
        "SELECT r.* FROM pipeline_runs r WHERE r.dag_id IN {} AND r.logical_date_ms = \
           (SELECT MAX(x.logical_date_ms) FROM pipeline_runs x WHERE x.dag_id = r.dag_id)",
        placeholders(1, values.len())
    );
    let rows = run::Entity::find()
        .from_raw_sql(sql(db, &text, values))
        .all(db)
        .await?;
    Ok(rows.into_iter().map(|r| (r.dag_id.clone(), r)).collect())
}

/// One task of a run's DAG version, as the run needs it to create its instances.
#[derive(Debug, Clone)]
pub struct TaskPlan {
    pub task_id: String,
    pub task_type: String,
    pub upstream: Vec<String>,
    pub downstream: Vec<String>,
    pub pool: String,
    pub priority_weight: i32,
    /// Tries allowed: retries + 1.
    pub max_tries: i32,
}

/// Runs of `dag_id` waiting in `queued`, oldest logical date first.
pub async fn queued_runs(
    db: &impl ConnectionTrait,
    dag_id: &str,
    limit: u64,
) -> Result<Vec<run::Model>> {
    Ok(run::Entity::find()
        .from_raw_sql(sql(
            db,
            &format!(
                "SELECT * FROM pipeline_runs WHERE dag_id = $1 AND state = 'queued' \
                 ORDER BY logical_date_ms LIMIT {limit}"
            ),
            vec![dag_id.into()],
        ))
        .all(db)
        .await?)
}

/// Running runs per DAG and per backfill.
pub async fn running_counts(
    db: &impl ConnectionTrait,
) -> Result<(HashMap<String, i64>, HashMap<i64, i64>)> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT dag_id, backfill_id, COUNT(*) AS n FROM pipeline_runs \
             WHERE state = 'running' GROUP BY dag_id, backfill_id",
            vec![],
        ))
        .await?;
    let mut by_dag: HashMap<String, i64> = HashMap::new();
    let mut by_backfill: HashMap<i64, i64> = HashMap::new();
    for r in rows {
        let n = col_i64(&r, "n")?;
        *by_dag.entry(col_str(&r, "dag_id")?).or_default() += n;
        if let Some(b) = r.try_get::<Option<i64>>("", "backfill_id")? {
            *by_backfill.entry(b).or_default() += n;
        }
    }
    Ok((by_dag, by_backfill))
}

/// `max_active_runs` of backfills that are running.
pub async fn backfill_limits(db: &impl ConnectionTrait) -> Result<HashMap<i64, i64>> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT id, max_active_runs FROM pipeline_backfills WHERE state = 'running'",
            vec![],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                col_i64(r, "id")?,
                i64::from(r.try_get::<i32>("", "max_active_runs")?),
            ))
        })
        .collect()
}

/// Start a queued run: `running`, its task instances created (kept when the run is a clear's
/// rerun), and readiness computed for the instances in `none`. False when another process
/// started it first.
pub async fn start_run(
    db: &DatabaseConnection,
    run: &run::Model,
    hash: &str,
    plan: &[TaskPlan],
    now: i64,
) -> Result<bool> {
    let tx = db.begin().await?;
    let r = tx
        .execute(sql(
            &tx,
            "UPDATE pipeline_runs SET state = 'running', start_ms = COALESCE(start_ms, $2), \
               end_ms = NULL, dag_hash = COALESCE(dag_hash, $3) \
             WHERE id = $1 AND state = 'queued'",
            vec![run.id.into(), now.into(), hash.into()],
        ))
        .await?;
    if r.rows_affected() == 0 {
        return Ok(false);
    }
    for chunk in plan.chunks(300) {
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 10);
        let mut rows = Vec::with_capacity(chunk.len());
        for t in chunk {
            let f = values.len() + 1;
            rows.push(format!(
                "(${},${},${},'none',0,${},0,${},${},${},${},${})",
                f,
                f + 1,
                f + 2,
                f + 3,
                f + 4,
                f + 5,
                f + 6,
                f + 7,
                f + 8
            ));
            values.extend([
                run.id.into(),
                run.dag_id.clone().into(),
                t.task_id.clone().into(),
                t.max_tries.into(),
                serde_json::to_string(&t.upstream)
                    .unwrap_or_default()
                    .into(),
                serde_json::to_string(&t.downstream)
                    .unwrap_or_default()
                    .into(),
                t.pool.clone().into(),
                t.priority_weight.into(),
                t.task_type.clone().into(),
            ]);
        }
        let text = format!(
            "INSERT INTO pipeline_task_instances (run_pk, dag_id, task_id, state, try_number, \
               max_tries, pending_upstream, upstream, downstream, pool, priority_weight, task_type) \
             VALUES {} ON CONFLICT (run_pk, task_id) DO NOTHING",
            rows.join(",")
        );
        tx.execute(sql(&tx, &text, values)).await?;
    }
    recompute_readiness(&tx, run.id, now).await?;
    tx.commit().await?;
    Ok(true)
}

/// For every instance of run `run_pk` in `none`: count its unfinished upstreams; with an upstream
/// that failed it is `upstream_failed`, with one skipped it is `skipped`, with none left it is
/// `scheduled`. Failures and skips are carried through waiting chains (a cleared `b → c` under a
/// failed `a` ends both `upstream_failed`, not `c` waiting for ever).
async fn recompute_readiness(db: &impl ConnectionTrait, run_pk: i64, now: i64) -> Result<()> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT id, task_id, state, upstream FROM pipeline_task_instances WHERE run_pk = $1",
            vec![run_pk.into()],
        ))
        .await?;
    let mut states: HashMap<String, String> = HashMap::new();
    let mut waiting = Vec::new();
    for r in &rows {
        let task = col_str(r, "task_id")?;
        let st = col_str(r, "state")?;
        if st == state::NONE {
            waiting.push((
                col_i64(r, "id")?,
                task.clone(),
                json_list(&col_str(r, "upstream")?),
            ));
        }
        states.insert(task, st);
    }
    let mut decided: HashMap<i64, (&'static str, i64)> = HashMap::new();
    // To a fixed point: a DAG is acyclic, so this takes at most its depth in rounds.
    loop {
        let mut changed = false;
        for (id, task, ups) in &waiting {
            let mut pending = 0i64;
            let mut failed = false;
            let mut skipped = false;
            for u in ups {
                match states.get(u).map(String::as_str) {
                    Some(state::SUCCESS) => {}
                    Some(state::SKIPPED) => skipped = true,
                    Some(state::FAILED | state::UPSTREAM_FAILED) => failed = true,
                    _ => pending += 1,
                }
            }
            // A failure wins over a skip, as in Airflow's `all_success`.
            let key = if failed {
                (state::UPSTREAM_FAILED, 0)
            } else if skipped {
                (state::SKIPPED, 0)
            } else if pending == 0 {
                (state::SCHEDULED, 0)
            } else {
                (state::NONE, pending)
            };
            if (key.0 == state::UPSTREAM_FAILED || key.0 == state::SKIPPED)
                && states.get(task).map(String::as_str) != Some(key.0)
            {
                states.insert(task.clone(), key.0.to_owned());
                changed = true;
            }
            decided.insert(*id, key);
        }
        if !changed {
            break;
        }
    }
    // Group by outcome so a 1,000-task run costs a handful of statements.
    let mut by: BTreeMap<(&str, i64), Vec<i64>> = BTreeMap::new();
    for (id, key) in decided {
        by.entry(key).or_default().push(id);
    }
    for ((st, pending), ids) in by {
        for chunk in ids.chunks(500) {
            let ready = if st == state::SCHEDULED {
                Some(now)
            } else {
                None
            };
            let end = if st == state::UPSTREAM_FAILED || st == state::SKIPPED {
                Some(now)
            } else {
                None
            };
            db.execute(sql(
                db,
                &format!(
                    "UPDATE pipeline_task_instances SET state = $1, pending_upstream = $2, \
                       ready_at_ms = $3, end_ms = $4 WHERE state = 'none' AND id IN {}",
                    id_list(chunk)
                ),
                vec![st.into(), pending.into(), ready.into(), end.into()],
            ))
            .await?;
        }
    }
    Ok(())
}

/// A run that just finished.
#[derive(Debug, Clone)]
pub struct FinishedRun {
    pub dag_id: String,
    pub run_type: String,
    pub state: &'static str,
}

/// Finish every running run with no unfinished instance: `failed` if any instance failed,
/// else `success`. Then finish backfills with nothing left to run.
pub async fn finish_runs(db: &impl ConnectionTrait, now: i64) -> Result<Vec<FinishedRun>> {
    let rows = db
        .query_all(sql(
            db,
            &format!(
                "SELECT r.id, r.dag_id, r.run_type, \
                   EXISTS (SELECT 1 FROM pipeline_task_instances t WHERE t.run_pk = r.id \
                           AND t.state IN ('failed','upstream_failed')) AS bad \
                 FROM pipeline_runs r WHERE r.state = 'running' AND NOT EXISTS \
                   (SELECT 1 FROM pipeline_task_instances t WHERE t.run_pk = r.id \
                    AND t.state IN {})",
                state::UNFINISHED_SQL
            ),
            vec![],
        ))
        .await?;
    let mut done = Vec::new();
    for r in rows {
        let bad = r.try_get::<bool>("", "bad")?;
        let st = if bad { state::FAILED } else { state::SUCCESS };
        let n = db
            .execute(sql(
                db,
                "UPDATE pipeline_runs SET state = $2, end_ms = $3 WHERE id = $1 AND state = 'running'",
                vec![col_i64(&r, "id")?.into(), st.into(), now.into()],
            ))
            .await?
            .rows_affected();
        if n == 1 {
            done.push(FinishedRun {
                dag_id: col_str(&r, "dag_id")?,
                run_type: col_str(&r, "run_type")?,
                state: st,
            });
        }
    }
    if !done.is_empty() {
        db.execute(sql(
            db,
            "UPDATE pipeline_backfills SET state = 'done' WHERE state = 'running' AND NOT EXISTS \
               (SELECT 1 FROM pipeline_runs r WHERE r.backfill_id = pipeline_backfills.id \
                AND r.state IN ('queued','running'))",
            vec![],
        ))
        .await?;
    }
    Ok(done)
}

/// Unfinished runs whose interval ended more than their DAG's `sla` ago, per DAG.
pub async fn runs_past_sla(db: &impl ConnectionTrait, now: i64) -> Result<HashMap<String, i64>> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT r.dag_id, COUNT(*) AS n FROM pipeline_runs r JOIN pipeline_dags d \
               ON d.dag_id = r.dag_id \
             WHERE r.state IN ('queued','running') AND d.sla_ms IS NOT NULL \
               AND r.interval_end_ms + d.sla_ms < $1 GROUP BY r.dag_id",
            vec![now.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| Ok((col_str(r, "dag_id")?, col_i64(r, "n")?)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Task instances

pub async fn task_instances(db: &impl ConnectionTrait, run_pk: i64) -> Result<Vec<ti::Model>> {
    Ok(ti::Entity::find()
        .from_raw_sql(sql(
            db,
            "SELECT * FROM pipeline_task_instances WHERE run_pk = $1 ORDER BY id",
            vec![run_pk.into()],
        ))
        .all(db)
        .await?)
}

pub async fn task_instance(db: &impl ConnectionTrait, id: i64) -> Result<ti::Model> {
    ti::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no task instance {id}")))
}

pub async fn task_instance_of(
    db: &impl ConnectionTrait,
    run_pk: i64,
    task_id: &str,
) -> Result<ti::Model> {
    ti::Entity::find()
        .from_raw_sql(sql(
            db,
            "SELECT * FROM pipeline_task_instances WHERE run_pk = $1 AND task_id = $2",
            vec![run_pk.into(), task_id.into()],
        ))
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("the run has no task `{task_id}`")))
}

pub async fn tries(db: &impl ConnectionTrait, ti_id: i64) -> Result<Vec<task_try::Model>> {
    Ok(task_try::Entity::find()
        .from_raw_sql(sql(
            db,
            "SELECT * FROM pipeline_task_tries WHERE ti_id = $1 ORDER BY try_number",
            vec![ti_id.into()],
        ))
        .all(db)
        .await?)
}

/// Instances ready to queue: `scheduled`, or `up_for_retry` whose delay has passed, in runs
/// that are running, of DAGs not paused; by priority, then readiness.
pub async fn ready(db: &impl ConnectionTrait, now: i64, limit: usize) -> Result<Vec<ti::Model>> {
    Ok(ti::Entity::find()
        .from_raw_sql(sql(
            db,
            &format!(
                "SELECT t.* FROM pipeline_task_instances t \
                 JOIN pipeline_runs r ON r.id = t.run_pk \
                 JOIN pipeline_dags d ON d.dag_id = t.dag_id \
                 WHERE (t.state = 'scheduled' OR (t.state = 'up_for_retry' \
                        AND t.next_attempt_at_ms <= $1)) \
                   AND r.state = 'running' AND NOT d.is_paused \
                 ORDER BY t.priority_weight DESC, t.id LIMIT {limit}"
            ),
            vec![now.into()],
        ))
        .all(db)
        .await?)
}

/// Instances holding a slot (`queued` or `running`), per pool and per DAG.
pub async fn slot_usage(
    db: &impl ConnectionTrait,
) -> Result<(HashMap<String, i64>, HashMap<String, i64>)> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT pool, dag_id, COUNT(*) AS n FROM pipeline_task_instances \
             WHERE state IN ('queued','running') GROUP BY pool, dag_id",
            vec![],
        ))
        .await?;
    let mut by_pool: HashMap<String, i64> = HashMap::new();
    let mut by_dag: HashMap<String, i64> = HashMap::new();
    for r in rows {
        let n = col_i64(&r, "n")?;
        *by_pool.entry(col_str(&r, "pool")?).or_default() += n;
        *by_dag.entry(col_str(&r, "dag_id")?).or_default() += n;
    }
    Ok((by_pool, by_dag))
}

/// Counts of instances by state (`queued`, `deferred`, ...) over all runs, and waiting (ready)
/// instances per pool — for the gauges.
pub async fn backlog(
    db: &impl ConnectionTrait,
) -> Result<(HashMap<String, i64>, HashMap<String, i64>)> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT state, pool, COUNT(*) AS n FROM pipeline_task_instances \
             WHERE state IN ('scheduled','queued','running','deferred','up_for_retry') \
             GROUP BY state, pool",
            vec![],
        ))
        .await?;
    let mut by_state: HashMap<String, i64> = HashMap::new();
    let mut waiting: HashMap<String, i64> = HashMap::new();
    for r in rows {
        let n = col_i64(&r, "n")?;
        let st = col_str(&r, "state")?;
        if st == state::SCHEDULED {
            *waiting.entry(col_str(&r, "pool")?).or_default() += n;
        }
        *by_state.entry(st).or_default() += n;
    }
    Ok((by_state, waiting))
}

/// Move one ready instance to `to` (`queued`, or `deferred` for a sensor) with its next try
/// number and rendered job. False when it was no longer ready (another scheduler, a clear).
pub async fn take_ready(
    db: &impl ConnectionTrait,
    id: i64,
    try_number: i32,
    to: &str,
    rendered: &str,
    now: i64,
) -> Result<bool> {
    let started = if to == state::DEFERRED {
        Some(now)
    } else {
        None
    };
    let r = db
        .execute(sql(
            db,
            "UPDATE pipeline_task_instances SET state = $2, try_number = $3, rendered = $4, \
               queued_at_ms = $5, start_ms = $6, end_ms = NULL, duration_ms = NULL, \
               next_attempt_at_ms = $7, heartbeat_at_ms = NULL, worker = NULL, exit_code = NULL, \
               error = NULL \
             WHERE id = $1 AND try_number = $3 - 1 AND state IN ('scheduled','up_for_retry')",
            vec![
                id.into(),
                to.into(),
                try_number.into(),
                rendered.into(),
                now.into(),
                started.into(),
                started.into(),
            ],
        ))
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Instances queued before `before` that no worker started (a publish lost to a crash, or a
/// message dropped): the scheduler publishes them again (the message id makes a duplicate
/// harmless).
pub async fn stale_queued(db: &impl ConnectionTrait, before: i64) -> Result<Vec<(i64, i32)>> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT id, try_number FROM pipeline_task_instances \
             WHERE state = 'queued' AND queued_at_ms < $1 LIMIT 1000",
            vec![before.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| Ok((col_i64(r, "id")?, r.try_get::<i32>("", "try_number")?)))
        .collect()
}

/// Touch `queued_at_ms` of a re-published instance, so it is not re-published every pass.
pub async fn requeued(db: &impl ConnectionTrait, id: i64, try_number: i32, now: i64) -> Result<()> {
    db.execute(sql(
        db,
        "UPDATE pipeline_task_instances SET queued_at_ms = $3 \
         WHERE id = $1 AND try_number = $2 AND state = 'queued'",
        vec![id.into(), try_number.into(), now.into()],
    ))
    .await?;
    Ok(())
}

/// A worker takes a queued try: `running`, with its name and first heartbeat. `None` when the
/// try is not queued any more (a redelivery, a clear, a zombie sweep).
pub async fn start_try(
    db: &impl ConnectionTrait,
    id: i64,
    try_number: i32,
    worker: &str,
    now: i64,
) -> Result<Option<ti::Model>> {
    let r = db
        .execute(sql(
            db,
            "UPDATE pipeline_task_instances SET state = 'running', start_ms = $4, \
               heartbeat_at_ms = $4, worker = $3 \
             WHERE id = $1 AND try_number = $2 AND state = 'queued'",
            vec![id.into(), try_number.into(), worker.into(), now.into()],
        ))
        .await?;
    if r.rows_affected() == 0 {
        return Ok(None);
    }
    Ok(Some(task_instance(db, id).await?))
}

/// Record that the try is alive. False when it is no longer this worker's running try.
pub async fn heartbeat(
    db: &impl ConnectionTrait,
    id: i64,
    try_number: i32,
    now: i64,
) -> Result<bool> {
    let r = db
        .execute(sql(
            db,
            "UPDATE pipeline_task_instances SET heartbeat_at_ms = $3 \
             WHERE id = $1 AND try_number = $2 AND state = 'running'",
            vec![id.into(), try_number.into(), now.into()],
        ))
        .await?;
    Ok(r.rows_affected() == 1)
}

/// How a try ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Done; each named dataset gets an event in the same transaction.
    Success { datasets: Vec<String> },
    /// Nothing to do (a shell exit code in `skip_on_exit_code`, a `soft_fail` sensor that timed
    /// out): the instance is `skipped`, never retried, and everything downstream is skipped.
    Skipped { reason: String },
    Failed {
        error: String,
        /// Delay before the next try, when one is allowed.
        retry_delay: std::time::Duration,
    },
}

/// What finishing a try changed.
#[derive(Debug, Clone)]
pub struct Finished {
    pub dag_id: String,
    pub pool: String,
    /// The state the instance ended in: success, failed or up_for_retry.
    pub state: &'static str,
    pub duration_ms: i64,
    /// Downstream instances that became ready (the scheduler should look now).
    pub newly_ready: u64,
    /// Downstream instances marked upstream_failed.
    pub upstream_failed: u64,
    /// Downstream instances marked skipped.
    pub skipped: u64,
}

/// Finish a try that is `running` (a worker's task) or `deferred` (a sensor). One transaction:
/// the instance's state, the try's record, and its downstreams' readiness — a success
/// decrements them; a final failure marks everything downstream `upstream_failed`. `None` when
/// the try was not in a state to finish (already finished, cleared or swept as a zombie).
pub async fn finish_try(
    db: &DatabaseConnection,
    id: i64,
    try_number: i32,
    outcome: &Outcome,
    exit_code: Option<i32>,
    details: Option<&serde_json::Value>,
    now: i64,
) -> Result<Option<Finished>> {
    let tx = db.begin().await?;
    // The guarded update comes first: on SQLite a transaction that reads before it writes can
    // fail outright (a stale WAL snapshot) instead of waiting for the writer lock.
    let (ended, error, delay) = match outcome {
        Outcome::Success { .. } => (state::SUCCESS, None, 0i64),
        Outcome::Skipped { reason } => (state::SKIPPED, Some(reason.clone()), 0),
        Outcome::Failed { error, retry_delay } => (
            state::FAILED,
            Some(error.clone()),
            i64::try_from(retry_delay.as_millis()).unwrap_or(i64::MAX),
        ),
    };
    let r = tx
        .execute(sql(
            &tx,
            "UPDATE pipeline_task_instances SET \
               state = CASE WHEN $3 <> 'failed' THEN $3 WHEN try_number < max_tries \
                            THEN 'up_for_retry' ELSE 'failed' END, \
               end_ms = $4, duration_ms = CASE WHEN start_ms IS NULL OR start_ms > $4 THEN 0 ELSE $4 - start_ms END, \
               exit_code = $5, error = $6, \
               next_attempt_at_ms = CASE WHEN $3 = 'failed' AND try_number < max_tries \
                                         THEN $4 + $7 ELSE NULL END \
             WHERE id = $1 AND try_number = $2 AND state IN ('running','deferred')",
            vec![
                id.into(),
                try_number.into(),
                ended.into(),
                now.into(),
                exit_code.into(),
                error.clone().into(),
                delay.into(),
            ],
        ))
        .await?;
    if r.rows_affected() == 0 {
        return Ok(None);
    }
    let t = task_instance(&tx, id).await?;
    let new_state: &'static str = match t.state.as_str() {
        state::SUCCESS => state::SUCCESS,
        state::SKIPPED => state::SKIPPED,
        state::UP_FOR_RETRY => state::UP_FOR_RETRY,
        _ => state::FAILED,
    };
    let duration = t.duration_ms.unwrap_or(0);
    let try_state = if new_state == state::UP_FOR_RETRY {
        state::FAILED
    } else {
        new_state
    };
    tx.execute(sql(
        &tx,
        "INSERT INTO pipeline_task_tries (ti_id, try_number, state, start_ms, end_ms, worker, \
           exit_code, error, details) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) \
         ON CONFLICT (ti_id, try_number) DO UPDATE SET state = excluded.state, \
           end_ms = excluded.end_ms, exit_code = excluded.exit_code, error = excluded.error, \
           details = excluded.details",
        vec![
            id.into(),
            try_number.into(),
            try_state.into(),
            t.start_ms.into(),
            now.into(),
            t.worker.clone().into(),
            exit_code.into(),
            error.into(),
            details.map(serde_json::Value::to_string).into(),
        ],
    ))
    .await?;
    let downstream = json_list(&t.downstream);
    let mut newly_ready = 0;
    let mut upstream_failed = 0;
    let mut skipped = 0;
    if new_state == state::SUCCESS && !downstream.is_empty() {
        let values: Vec<Value> = std::iter::once(t.run_pk.into())
            .chain(downstream.iter().map(|d| d.clone().into()))
            .collect();
        let list = placeholders(2, downstream.len());
        tx.execute(sql(
            &tx,
            &format!(
                "UPDATE pipeline_task_instances SET pending_upstream = pending_upstream - 1 \
                 WHERE run_pk = $1 AND state = 'none' AND task_id IN {list}"
            ),
            values.clone(),
        ))
        .await?;
        let mut values = values;
        values.push(now.into());
        newly_ready = tx
            .execute(sql(
                &tx,
                &format!(
                    "UPDATE pipeline_task_instances SET state = 'scheduled', ready_at_ms = ${} \
                     WHERE run_pk = $1 AND state = 'none' AND pending_upstream <= 0 \
                       AND task_id IN {list}",
                    downstream.len() + 2
                ),
                values,
            ))
            .await?
            .rows_affected();
    } else if new_state == state::FAILED {
        upstream_failed =
            mark_downstream(&tx, t.run_pk, &t.task_id, state::UPSTREAM_FAILED, now).await?;
    }
    if let (state::SUCCESS, Outcome::Success { datasets }) = (new_state, outcome) {
        let extra = serde_json::json!({
            "dag_id": t.dag_id, "task_id": t.task_id, "run_pk": t.run_pk, "try_number": try_number,
        });
        for d in datasets {
            add_dataset_event(&tx, d, &extra, now).await?;
        }
    }
    if new_state == state::SKIPPED {
        // Every task's trigger rule is "all upstreams succeeded" (Airflow's `all_success`), so
        // a skipped upstream skips what depends on it.
        skipped = mark_downstream(&tx, t.run_pk, &t.task_id, state::SKIPPED, now).await?;
    }
    tx.commit().await?;
    Ok(Some(Finished {
        dag_id: t.dag_id,
        pool: t.pool,
        state: new_state,
        duration_ms: duration,
        newly_ready,
        upstream_failed,
        skipped,
    }))
}

/// Mark every transitive downstream of `task_id` in `run_pk` that has not started `to`
/// (`upstream_failed` or `skipped`).
async fn mark_downstream(
    db: &impl ConnectionTrait,
    run_pk: i64,
    task_id: &str,
    to: &'static str,
    now: i64,
) -> Result<u64> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT task_id, downstream FROM pipeline_task_instances WHERE run_pk = $1",
            vec![run_pk.into()],
        ))
        .await?;
    let mut down: HashMap<String, Vec<String>> = HashMap::new();
    for r in &rows {
        down.insert(
            col_str(r, "task_id")?,
            json_list(&col_str(r, "downstream")?),
        );
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut stack: Vec<String> = down.get(task_id).cloned().unwrap_or_default();
    while let Some(t) = stack.pop() {
        if seen.insert(t.clone()) {
            stack.extend(down.get(&t).cloned().unwrap_or_default());
        }
    }
    if seen.is_empty() {
        return Ok(0);
    }
    let ids: Vec<String> = seen.into_iter().collect();
    let mut values: Vec<Value> = vec![run_pk.into(), now.into(), to.into()];
    values.extend(ids.iter().map(|d| d.clone().into()));
    let n = db
        .execute(sql(
            db,
            &format!(
                "UPDATE pipeline_task_instances SET state = $3, end_ms = $2 \
                 WHERE run_pk = $1 AND state IN ('none','scheduled','up_for_retry') \
                   AND task_id IN {}",
                placeholders(4, ids.len())
            ),
            values,
        ))
        .await?
        .rows_affected();
    Ok(n)
}

/// Running tries whose worker has not heartbeated since `before`.
pub async fn zombies(db: &impl ConnectionTrait, before: i64) -> Result<Vec<(i64, i32)>> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT id, try_number FROM pipeline_task_instances \
             WHERE state = 'running' AND heartbeat_at_ms < $1 LIMIT 1000",
            vec![before.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| Ok((col_i64(r, "id")?, r.try_get::<i32>("", "try_number")?)))
        .collect()
}

pub async fn deferred(db: &impl ConnectionTrait) -> Result<Vec<ti::Model>> {
    Ok(ti::Entity::find()
        .from_raw_sql(sql(
            db,
            "SELECT * FROM pipeline_task_instances WHERE state = 'deferred' ORDER BY id LIMIT 10000",
            vec![],
        ))
        .all(db)
        .await?)
}

/// A file sensor looks again at `at`.
pub async fn repoke(db: &impl ConnectionTrait, id: i64, try_number: i32, at: i64) -> Result<()> {
    db.execute(sql(
        db,
        "UPDATE pipeline_task_instances SET next_attempt_at_ms = $3 \
         WHERE id = $1 AND try_number = $2 AND state = 'deferred'",
        vec![id.into(), try_number.into(), at.into()],
    ))
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Clear (P3, P7)

/// One instance a clear selects.
#[derive(Debug, Clone)]
pub struct Cleared {
    pub ti_id: i64,
    pub run_pk: i64,
    pub dag_run_id: String,
    pub task_id: String,
    pub logical_date_ms: i64,
    pub state: String,
    pub try_number: i32,
}

/// Instances of `dag_id` in the date range / run, of the given tasks, optionally only failed
/// ones.
pub async fn clear_candidates(
    db: &impl ConnectionTrait,
    dag_id: &str,
    from: Option<i64>,
    to: Option<i64>,
    run_id: Option<&str>,
    tasks: &[String],
    only_failed: bool,
) -> Result<Vec<Cleared>> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let mut text = "SELECT t.id, t.run_pk, r.run_id, t.task_id, r.logical_date_ms, t.state, \
                      t.try_number FROM pipeline_task_instances t \
                    JOIN pipeline_runs r ON r.id = t.run_pk WHERE t.dag_id = $1"
        .to_owned();
    let mut values: Vec<Value> = vec![dag_id.into()];
    if let Some(f) = from {
        values.push(f.into());
        text.push_str(&format!(" AND r.logical_date_ms >= ${}", values.len()));
    }
    if let Some(t) = to {
        values.push(t.into());
        text.push_str(&format!(" AND r.logical_date_ms <= ${}", values.len()));
    }
    if let Some(r) = run_id {
        values.push(r.into());
        text.push_str(&format!(" AND r.run_id = ${}", values.len()));
    }
    if only_failed {
        text.push_str(" AND t.state IN ('failed','upstream_failed')");
    }
    text.push_str(&format!(
        " AND t.task_id IN {}",
        placeholders(values.len() + 1, tasks.len())
    ));
    values.extend(tasks.iter().map(|t| t.clone().into()));
    text.push_str(" ORDER BY r.logical_date_ms, t.task_id");
    let rows = db.query_all(sql(db, &text, values)).await?;
    rows.iter()
        .map(|r| {
            Ok(Cleared {
                ti_id: col_i64(r, "id")?,
                run_pk: col_i64(r, "run_pk")?,
                dag_run_id: col_str(r, "run_id")?,
                task_id: col_str(r, "task_id")?,
                logical_date_ms: col_i64(r, "logical_date_ms")?,
                state: col_str(r, "state")?,
                try_number: r.try_get::<i32>("", "try_number")?,
            })
        })
        .collect()
}

/// Reset the selected instances to `none` with a fresh set of tries (`retries` per task), and
/// put their runs back to `queued`: the scheduler restarts them within `max_active_runs` and
/// recomputes readiness, so just those instances (and what waits on them) run again.
pub async fn clear(
    db: &DatabaseConnection,
    selected: &[Cleared],
    retries: &HashMap<String, i32>,
) -> Result<u64> {
    let tx = db.begin().await?;
    let mut n = 0;
    for c in selected {
        let extra = retries.get(&c.task_id).copied().unwrap_or(0) + 1;
        n += tx
            .execute(sql(
                &tx,
                "UPDATE pipeline_task_instances SET state = 'none', pending_upstream = 0, \
                   max_tries = try_number + $2, ready_at_ms = NULL, queued_at_ms = NULL, \
                   end_ms = NULL, next_attempt_at_ms = NULL, heartbeat_at_ms = NULL \
                 WHERE id = $1",
                vec![c.ti_id.into(), extra.into()],
            ))
            .await?
            .rows_affected();
    }
    let mut runs: Vec<i64> = selected.iter().map(|c| c.run_pk).collect();
    runs.sort_unstable();
    runs.dedup();
    for chunk in runs.chunks(500) {
        tx.execute(sql(
            &tx,
            &format!(
                "UPDATE pipeline_runs SET state = 'queued', end_ms = NULL WHERE id IN {}",
                id_list(chunk)
            ),
            vec![],
        ))
        .await?;
    }
    tx.commit().await?;
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Backfills (P7, P15)

pub async fn create_backfill(
    db: &DatabaseConnection,
    b: backfill::Model,
    runs: Vec<NewRun>,
    rerun: &[Cleared],
    retries: &HashMap<String, i32>,
    now: i64,
) -> Result<backfill::Model> {
    let tx = db.begin().await?;
    let row = tx
        .query_one(sql(
            &tx,
            "INSERT INTO pipeline_backfills (dag_id, from_ms, to_ms, reprocess, max_active_runs, \
               state, total_runs, created_at_ms, created_by) \
             VALUES ($1,$2,$3,$4,$5,'running',$6,$7,$8) RETURNING id",
            vec![
                b.dag_id.clone().into(),
                b.from_ms.into(),
                b.to_ms.into(),
                b.reprocess.clone().into(),
                b.max_active_runs.into(),
                b.total_runs.into(),
                now.into(),
                b.created_by.clone().into(),
            ],
        ))
        .await?
        .ok_or_else(|| StoreError::Db(DbErr::RecordNotInserted))?;
    let id = col_i64(&row, "id")?;
    let runs: Vec<NewRun> = runs
        .into_iter()
        .map(|mut r| {
            r.backfill_id = Some(id);
            r
        })
        .collect();
    // A date the scheduler took between the plan and now is not this backfill's.
    let inserted = insert_runs(&tx, &runs, now).await?;
    let mut rerun_runs: Vec<i64> = rerun.iter().map(|c| c.run_pk).collect();
    rerun_runs.sort_unstable();
    rerun_runs.dedup();
    let total =
        i64::try_from(inserted).unwrap_or(i64::MAX) + i64::try_from(rerun_runs.len()).unwrap_or(0);
    tx.execute(sql(
        &tx,
        "UPDATE pipeline_backfills SET total_runs = $2 WHERE id = $1",
        vec![id.into(), total.into()],
    ))
    .await?;
    tx.commit().await?;
    if !rerun.is_empty() {
        // Existing runs that are reprocessed join the backfill and rerun through a clear.
        let mut pks: Vec<i64> = rerun.iter().map(|c| c.run_pk).collect();
        pks.sort_unstable();
        pks.dedup();
        for chunk in pks.chunks(500) {
            db.execute(sql(
                db,
                &format!(
                    "UPDATE pipeline_runs SET backfill_id = $1 WHERE id IN {}",
                    id_list(chunk)
                ),
                vec![id.into()],
            ))
            .await?;
        }
        clear(db, rerun, retries).await?;
    }
    backfill_by_id(db, id).await
}

pub async fn backfill_by_id(db: &impl ConnectionTrait, id: i64) -> Result<backfill::Model> {
    backfill::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no backfill {id}")))
}

pub async fn backfills(
    db: &impl ConnectionTrait,
    dag_id: Option<&str>,
    before_id: Option<i64>,
    limit: u64,
) -> Result<Vec<backfill::Model>> {
    let mut text = "SELECT * FROM pipeline_backfills WHERE 1 = 1".to_owned();
    let mut values: Vec<Value> = Vec::new();
    if let Some(d) = dag_id {
        values.push(d.into());
        text.push_str(&format!(" AND dag_id = ${}", values.len()));
    }
    if let Some(b) = before_id {
        values.push(b.into());
        text.push_str(&format!(" AND id < ${}", values.len()));
    }
    text.push_str(&format!(" ORDER BY id DESC LIMIT {limit}"));
    Ok(backfill::Entity::find()
        .from_raw_sql(sql(db, &text, values))
        .all(db)
        .await?)
}

/// Finished and failed run counts of a backfill.
pub async fn backfill_progress(db: &impl ConnectionTrait, id: i64) -> Result<(i64, i64)> {
    let row = db
        .query_one(sql(
            db,
            "SELECT \
               COALESCE(SUM(CASE WHEN state IN ('success','failed') THEN 1 ELSE 0 END), 0) AS done, \
               COALESCE(SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END), 0) AS bad \
             FROM pipeline_runs WHERE backfill_id = $1",
            vec![id.into()],
        ))
        .await?;
    match row {
        Some(r) => Ok((col_i64(&r, "done")?, col_i64(&r, "bad")?)),
        None => Ok((0, 0)),
    }
}

/// Logical dates of `dag_id` that already have a run, with the run's state, in [from, to].
pub async fn existing_runs(
    db: &impl ConnectionTrait,
    dag_id: &str,
    from: i64,
    to: i64,
) -> Result<HashMap<i64, (i64, String)>> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT id, logical_date_ms, state FROM pipeline_runs \
             WHERE dag_id = $1 AND logical_date_ms >= $2 AND logical_date_ms <= $3",
            vec![dag_id.into(), from.into(), to.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                col_i64(r, "logical_date_ms")?,
                (col_i64(r, "id")?, col_str(r, "state")?),
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Logs

pub async fn append_log(
    db: &impl ConnectionTrait,
    ti_id: i64,
    try_number: i32,
    chunk: &str,
    now: i64,
) -> Result<()> {
    db.execute(sql(
        db,
        "INSERT INTO pipeline_task_logs (ti_id, try_number, chunk, created_at_ms) \
         VALUES ($1,$2,$3,$4)",
        vec![ti_id.into(), try_number.into(), chunk.into(), now.into()],
    ))
    .await?;
    Ok(())
}

/// Log chunks of one try after `offset` (a chunk id; 0 from the start), and the offset to ask
/// for next.
pub async fn read_log(
    db: &impl ConnectionTrait,
    ti_id: i64,
    try_number: i32,
    offset: i64,
) -> Result<(String, i64)> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT id, chunk FROM pipeline_task_logs WHERE ti_id = $1 AND try_number = $2 \
               AND id > $3 ORDER BY id LIMIT 256",
            vec![ti_id.into(), try_number.into(), offset.into()],
        ))
        .await?;
    let mut content = String::new();
    let mut next = offset;
    for r in rows {
        next = col_i64(&r, "id")?;
        content.push_str(&col_str(&r, "chunk")?);
    }
    Ok((content, next))
}

// ---------------------------------------------------------------------------------------------
// Pools (P5)

pub async fn ensure_pool(db: &impl ConnectionTrait, name: &str, slots: u32) -> Result<()> {
    db.execute(sql(
        db,
        "INSERT INTO pipeline_pools (name, slots, description) VALUES ($1,$2,'') \
         ON CONFLICT (name) DO NOTHING",
        vec![name.into(), i64::from(slots).into()],
    ))
    .await?;
    Ok(())
}

pub async fn pools(db: &impl ConnectionTrait) -> Result<Vec<pool::Model>> {
    Ok(pool::Entity::find()
        .from_raw_sql(sql(
            db,
            "SELECT * FROM pipeline_pools ORDER BY name",
            vec![],
        ))
        .all(db)
        .await?)
}

pub async fn pool_by_name(db: &impl ConnectionTrait, name: &str) -> Result<pool::Model> {
    pool::Entity::find_by_id(name.to_owned())
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no pool `{name}`")))
}

pub async fn create_pool(
    db: &impl ConnectionTrait,
    name: &str,
    slots: i32,
    description: &str,
) -> Result<pool::Model> {
    let r = db
        .execute(sql(
            db,
            "INSERT INTO pipeline_pools (name, slots, description) VALUES ($1,$2,$3) \
             ON CONFLICT (name) DO NOTHING",
            vec![name.into(), slots.into(), description.into()],
        ))
        .await?;
    if r.rows_affected() == 0 {
        return Err(StoreError::Conflict(format!("pool `{name}` exists")));
    }
    pool_by_name(db, name).await
}

pub async fn update_pool(
    db: &impl ConnectionTrait,
    name: &str,
    slots: Option<i32>,
    description: Option<&str>,
) -> Result<pool::Model> {
    let r = db
        .execute(sql(
            db,
            "UPDATE pipeline_pools SET slots = COALESCE($2, slots), \
               description = COALESCE($3, description) WHERE name = $1",
            vec![
                name.into(),
                slots.into(),
                description.map(str::to_owned).into(),
            ],
        ))
        .await?;
    if r.rows_affected() == 0 {
        return Err(StoreError::NotFound(format!("no pool `{name}`")));
    }
    pool_by_name(db, name).await
}

// ---------------------------------------------------------------------------------------------
// Datasets

pub async fn add_dataset_event(
    db: &impl ConnectionTrait,
    dataset: &str,
    extra: &serde_json::Value,
    now: i64,
) -> Result<i64> {
    let row = db
        .query_one(sql(
            db,
            "INSERT INTO pipeline_dataset_events (dataset, extra, created_at_ms) \
             VALUES ($1,$2,$3) RETURNING id",
            vec![dataset.into(), extra.to_string().into(), now.into()],
        ))
        .await?
        .ok_or_else(|| StoreError::Db(DbErr::RecordNotInserted))?;
    Ok(col_i64(&row, "id")?)
}

/// Events after id `after` of the named datasets: (id, dataset, created_at_ms).
pub async fn dataset_events_after(
    db: &impl ConnectionTrait,
    datasets: &[String],
    after: i64,
) -> Result<Vec<(i64, String, i64)>> {
    if datasets.is_empty() {
        return Ok(Vec::new());
    }
    let mut values: Vec<Value> = vec![after.into()];
    values.extend(datasets.iter().map(|d| d.clone().into()));
    let rows = db
        .query_all(sql(
            db,
            &format!(
                "SELECT id, dataset, created_at_ms FROM pipeline_dataset_events \
                 WHERE id > $1 AND dataset IN {} ORDER BY id LIMIT 1000",
                placeholders(2, datasets.len())
            ),
            values,
        ))
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                col_i64(r, "id")?,
                col_str(r, "dataset")?,
                col_i64(r, "created_at_ms")?,
            ))
        })
        .collect()
}

/// Has `dataset` had an event at or after `since`?
pub async fn dataset_updated_since(
    db: &impl ConnectionTrait,
    dataset: &str,
    since: i64,
) -> Result<bool> {
    let row = db
        .query_one(sql(
            db,
            "SELECT 1 AS x FROM pipeline_dataset_events WHERE dataset = $1 AND created_at_ms >= $2 \
             LIMIT 1",
            vec![dataset.into(), since.into()],
        ))
        .await?;
    Ok(row.is_some())
}

// ---------------------------------------------------------------------------------------------
// The scheduler lease

/// Take the lease `name` for `holder` until `now + ttl` if it is free or lapsed (or already
/// ours). Returns the fencing token: it grows with every change of holder.
pub async fn acquire_lease(
    db: &impl ConnectionTrait,
    name: &str,
    holder: &str,
    ttl_ms: i64,
    now: i64,
) -> Result<Option<i64>> {
    let row = db
        .query_one(sql(
            db,
            "INSERT INTO pipeline_scheduler_lease (name, holder, token, expires_at_ms) \
             VALUES ($1,$2,1,$3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
               token = pipeline_scheduler_lease.token + 1, expires_at_ms = excluded.expires_at_ms \
             WHERE pipeline_scheduler_lease.expires_at_ms < $4 \
               OR pipeline_scheduler_lease.holder = excluded.holder \
             RETURNING token",
            vec![
                name.into(),
                holder.into(),
                now.saturating_add(ttl_ms).into(),
                now.into(),
            ],
        ))
        .await?;
    row.map(|r| col_i64(&r, "token"))
        .transpose()
        .map_err(Into::into)
}

/// Extend our lease; false when it is no longer ours.
pub async fn renew_lease(
    db: &impl ConnectionTrait,
    name: &str,
    holder: &str,
    token: i64,
    ttl_ms: i64,
    now: i64,
) -> Result<bool> {
    let r = db
        .execute(sql(
            db,
            "UPDATE pipeline_scheduler_lease SET expires_at_ms = $4 \
             WHERE name = $1 AND holder = $2 AND token = $3 AND expires_at_ms >= $5",
            vec![
                name.into(),
                holder.into(),
                token.into(),
                now.saturating_add(ttl_ms).into(),
                now.into(),
            ],
        ))
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Give the lease up (a clean shutdown): a standby takes over at once.
pub async fn release_lease(
    db: &impl ConnectionTrait,
    name: &str,
    holder: &str,
    token: i64,
) -> Result<()> {
    db.execute(sql(
        db,
        "UPDATE pipeline_scheduler_lease SET expires_at_ms = 0 \
         WHERE name = $1 AND holder = $2 AND token = $3",
        vec![name.into(), holder.into(), token.into()],
    ))
    .await?;
    Ok(())
}

/// Who holds the lease now, if anyone: (holder, token).
pub async fn lease_holder(
    db: &impl ConnectionTrait,
    name: &str,
    now: i64,
) -> Result<Option<(String, i64)>> {
    let row = db
        .query_one(sql(
            db,
            "SELECT holder, token FROM pipeline_scheduler_lease \
             WHERE name = $1 AND expires_at_ms >= $2",
            vec![name.into(), now.into()],
        ))
        .await?;
    row.map(|r| Ok((col_str(&r, "holder")?, col_i64(&r, "token")?)))
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// Views over several runs

/// Task id → state for each run in `pks` (the UI's grid).
pub async fn states_of_runs(
    db: &impl ConnectionTrait,
    pks: &[i64],
) -> Result<HashMap<i64, HashMap<String, String>>> {
    let mut out: HashMap<i64, HashMap<String, String>> = HashMap::new();
    for chunk in pks.chunks(500) {
        let rows = db
            .query_all(sql(
                db,
                &format!(
                    "SELECT run_pk, task_id, state FROM pipeline_task_instances WHERE run_pk IN {}",
                    id_list(chunk)
                ),
                vec![],
            ))
            .await?;
        for r in rows {
            out.entry(col_i64(&r, "run_pk")?)
                .or_default()
                .insert(col_str(&r, "task_id")?, col_str(&r, "state")?);
        }
    }
    Ok(out)
}

/// Every instance of the runs `pks`, as a clear selects them (a backfill's reprocessing).
pub async fn instances_of_runs(db: &impl ConnectionTrait, pks: &[i64]) -> Result<Vec<Cleared>> {
    let mut out = Vec::new();
    for chunk in pks.chunks(500) {
        let rows = db
            .query_all(sql(
                db,
                &format!(
                    "SELECT t.id, t.run_pk, r.run_id, t.task_id, r.logical_date_ms, t.state, \
                       t.try_number FROM pipeline_task_instances t \
                     JOIN pipeline_runs r ON r.id = t.run_pk WHERE t.run_pk IN {}",
                    id_list(chunk)
                ),
                vec![],
            ))
            .await?;
        for r in rows {
            out.push(Cleared {
                ti_id: col_i64(&r, "id")?,
                run_pk: col_i64(&r, "run_pk")?,
                dag_run_id: col_str(&r, "run_id")?,
                task_id: col_str(&r, "task_id")?,
                logical_date_ms: col_i64(&r, "logical_date_ms")?,
                state: col_str(&r, "state")?,
                try_number: r.try_get::<i32>("", "try_number")?,
            });
        }
    }
    Ok(out)
}

/// Instances per pool and state (queued, running, deferred) for the pools' view.
pub async fn pool_counts(
    db: &impl ConnectionTrait,
) -> Result<HashMap<String, HashMap<String, i64>>> {
    let rows = db
        .query_all(sql(
            db,
            "SELECT pool, state, COUNT(*) AS n FROM pipeline_task_instances \
             WHERE state IN ('queued','running','deferred') GROUP BY pool, state",
            vec![],
        ))
        .await?;
    let mut out: HashMap<String, HashMap<String, i64>> = HashMap::new();
    for r in rows {
        out.entry(col_str(&r, "pool")?)
            .or_default()
            .insert(col_str(&r, "state")?, col_i64(&r, "n")?);
    }
    Ok(out)
}
