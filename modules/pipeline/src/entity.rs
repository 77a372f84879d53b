//! sea-orm entities of the module's tables (migrations/src/pipeline). State changes are SQL in
//! [`crate::store`], where a transition is one guarded `UPDATE` (the `WHERE` names the state it
//! leaves), so two processes can never both make it.

macro_rules! entity {
    ($module:ident, $table:literal, { $($body:tt)* }) => {
        pub mod $module {
            use sea_orm::entity::prelude::*;

            #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
            #[sea_orm(table_name = $table)]
            pub struct Model { $($body)* }

            #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
            pub enum Relation {}

            impl ActiveModelBehavior for ActiveModel {}
        }
    };
}

entity!(dag, "pipeline_dags", {
    #[sea_orm(primary_key, auto_increment = false)]
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
    /// JSON array.
    pub tags: String,
    pub max_active_runs: i32,
    pub max_active_tasks: i32,
    pub sla_ms: Option<i64>,
    pub is_paused: bool,
    pub is_active: bool,
    pub next_logical_ms: Option<i64>,
    /// JSON: `[{task_id, type, depends_on, pool, priority_weight, retries, timeout_seconds}]`.
    pub definition: String,
    pub updated_at_ms: i64,
});

entity!(run, "pipeline_runs", {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub dag_id: String,
    pub run_id: String,
    pub logical_date_ms: i64,
    pub interval_start_ms: i64,
    pub interval_end_ms: i64,
    pub run_type: String,
    pub state: String,
    /// JSON object.
    pub conf: String,
    pub dag_hash: Option<String>,
    pub backfill_id: Option<i64>,
    pub queued_at_ms: i64,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
});

entity!(task_instance, "pipeline_task_instances", {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub run_pk: i64,
    pub dag_id: String,
    pub task_id: String,
    pub state: String,
    pub try_number: i32,
    pub max_tries: i32,
    pub pending_upstream: i32,
    /// JSON arrays of task ids.
    pub upstream: String,
    pub downstream: String,
    pub pool: String,
    pub priority_weight: i32,
    pub task_type: String,
    /// JSON of [`crate::exec::Job`] as rendered for the current try.
    pub rendered: Option<String>,
    pub ready_at_ms: Option<i64>,
    pub queued_at_ms: Option<i64>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub duration_ms: Option<i64>,
    pub heartbeat_at_ms: Option<i64>,
    pub next_attempt_at_ms: Option<i64>,
    pub worker: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
});

entity!(task_try, "pipeline_task_tries", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub ti_id: i64,
    #[sea_orm(primary_key, auto_increment = false)]
    pub try_number: i32,
    pub state: String,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub worker: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// JSON: what the try reported (a `sql` task's bytes read, rows, Delta version, checks).
    pub details: Option<String>,
});

entity!(pool, "pipeline_pools", {
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    pub slots: i32,
    pub description: String,
});

entity!(backfill, "pipeline_backfills", {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub dag_id: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub reprocess: String,
    pub max_active_runs: i32,
    pub state: String,
    pub total_runs: i32,
    pub created_at_ms: i64,
    pub created_by: String,
});
