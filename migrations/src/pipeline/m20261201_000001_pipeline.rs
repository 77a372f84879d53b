//! The orchestrator's metadata (P2): DAGs and their versions, runs, task instances with their
//! tries and logs, pools, backfills, dataset events, import errors and the scheduler lease.
//! Times are Unix milliseconds from Bulwark's clock.
//!
//! * `pipeline_task_instances.pending_upstream` counts the upstreams not yet finished well, so
//!   readiness is a decrement when an upstream succeeds, never a rescan of the run.
//! * `(state, pool)` and `(run_id, state)` serve the scheduler's queries; `(dag_id,
//!   logical_date_ms)` is unique, so one logical date has one run (a rerun is a clear).
//! * `pipeline_scheduler_lease` has one row per lease name; the holder renews it with a
//!   compare-and-set on `token`, so a process that lost it cannot act as the scheduler.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum PipelineDags {
    Table,
    DagId,
    File,
    Hash,
    Schedule,
    Timezone,
    StartDateMs,
    EndDateMs,
    Catchup,
    Description,
    Owner,
    Tags,
    MaxActiveRuns,
    MaxActiveTasks,
    SlaMs,
    IsPaused,
    IsActive,
    NextLogicalMs,
    Definition,
    UpdatedAtMs,
}

#[derive(DeriveIden)]
enum PipelineDagVersions {
    Table,
    DagId,
    Hash,
    Definition,
    CreatedAtMs,
}

#[derive(DeriveIden)]
enum PipelineRuns {
    Table,
    Id,
    DagId,
    RunId,
    LogicalDateMs,
    IntervalStartMs,
    IntervalEndMs,
    RunType,
    State,
    Conf,
    DagHash,
    BackfillId,
    QueuedAtMs,
    StartMs,
    EndMs,
}

#[derive(DeriveIden)]
enum PipelineTaskInstances {
    Table,
    Id,
    RunPk,
    DagId,
    TaskId,
    State,
    TryNumber,
    MaxTries,
    PendingUpstream,
    Upstream,
    Downstream,
    Pool,
    PriorityWeight,
    TaskType,
    Rendered,
    ReadyAtMs,
    QueuedAtMs,
    StartMs,
    EndMs,
    DurationMs,
    HeartbeatAtMs,
    NextAttemptAtMs,
    Worker,
    ExitCode,
    Error,
}

#[derive(DeriveIden)]
enum PipelineTaskTries {
    Table,
    TiId,
    TryNumber,
    State,
    StartMs,
    EndMs,
    Worker,
    ExitCode,
    Error,
}

#[derive(DeriveIden)]
enum PipelineTaskLogs {
    Table,
    Id,
    TiId,
    TryNumber,
    Chunk,
    CreatedAtMs,
}

#[derive(DeriveIden)]
enum PipelinePools {
    Table,
    Name,
    Slots,
    Description,
}

#[derive(DeriveIden)]
enum PipelineBackfills {
    Table,
    Id,
    DagId,
    FromMs,
    ToMs,
    Reprocess,
    MaxActiveRuns,
    State,
    TotalRuns,
    CreatedAtMs,
    CreatedBy,
}

#[derive(DeriveIden)]
enum PipelineDatasetEvents {
    Table,
    Id,
    Dataset,
    Extra,
    CreatedAtMs,
}

#[derive(DeriveIden)]
enum PipelineImportErrors {
    Table,
    File,
    Line,
    Message,
    UpdatedAtMs,
}

#[derive(DeriveIden)]
enum PipelineSchedulerLease {
    Table,
    Name,
    Holder,
    Token,
    ExpiresAtMs,
}

fn id(c: impl IntoIden) -> ColumnDef {
    ColumnDef::new(c)
        .big_integer()
        .not_null()
        .auto_increment()
        .primary_key()
        .to_owned()
}
fn big(c: impl IntoIden) -> ColumnDef {
    ColumnDef::new(c).big_integer().not_null().to_owned()
}
fn big_null(c: impl IntoIden) -> ColumnDef {
    ColumnDef::new(c).big_integer().null().to_owned()
}
fn int(c: impl IntoIden) -> ColumnDef {
    ColumnDef::new(c).integer().not_null().to_owned()
}
fn int_null(c: impl IntoIden) -> ColumnDef {
    ColumnDef::new(c).integer().null().to_owned()
}
fn name(c: impl IntoIden, len: u32) -> ColumnDef {
    ColumnDef::new(c).string_len(len).not_null().to_owned()
}
fn text(c: impl IntoIden) -> ColumnDef {
    ColumnDef::new(c).text().not_null().to_owned()
}
fn text_null(c: impl IntoIden) -> ColumnDef {
    ColumnDef::new(c).text().null().to_owned()
}
fn flag(c: impl IntoIden) -> ColumnDef {
    ColumnDef::new(c).boolean().not_null().to_owned()
}

async fn index(
    manager: &SchemaManager<'_>,
    name: &str,
    table: impl IntoIden + 'static,
    cols: Vec<DynIden>,
    unique: bool,
) -> Result<(), DbErr> {
    let mut i = Index::create();
    i.name(name).table(table).if_not_exists();
    for c in cols {
        i.col(c);
    }
    if unique {
        i.unique();
    }
    manager.create_index(i.to_owned()).await
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use PipelineDags as D;
        manager
            .create_table(
                Table::create()
                    .table(D::Table)
                    .if_not_exists()
                    .col(name(D::DagId, 250).primary_key())
                    .col(text_null(D::File))
                    .col(name(D::Hash, 64))
                    .col(text(D::Schedule))
                    .col(name(D::Timezone, 64))
                    .col(big(D::StartDateMs))
                    .col(big_null(D::EndDateMs))
                    .col(flag(D::Catchup))
                    .col(text(D::Description))
                    .col(text(D::Owner))
                    // JSON array.
                    .col(text(D::Tags))
                    .col(int(D::MaxActiveRuns))
                    .col(int(D::MaxActiveTasks))
                    .col(big_null(D::SlaMs))
                    .col(flag(D::IsPaused))
                    // False once its file is gone or broken: kept for history, not scheduled.
                    .col(flag(D::IsActive))
                    // The next scheduled interval's start, once the scheduler has looked.
                    .col(big_null(D::NextLogicalMs))
                    // JSON of the tasks (ids, types, dependencies) for the graph and grid.
                    .col(text(D::Definition))
                    .col(big(D::UpdatedAtMs))
                    .to_owned(),
            )
            .await?;

        use PipelineDagVersions as V;
        manager
            .create_table(
                Table::create()
                    .table(V::Table)
                    .if_not_exists()
                    .col(name(V::DagId, 250))
                    .col(name(V::Hash, 64))
                    .col(text(V::Definition))
                    .col(big(V::CreatedAtMs))
                    .primary_key(Index::create().col(V::DagId).col(V::Hash))
                    .to_owned(),
            )
            .await?;

        use PipelineRuns as R;
        manager
            .create_table(
                Table::create()
                    .table(R::Table)
                    .if_not_exists()
                    .col(id(R::Id))
                    .col(name(R::DagId, 250))
                    .col(name(R::RunId, 250))
                    .col(big(R::LogicalDateMs))
                    .col(big(R::IntervalStartMs))
                    .col(big(R::IntervalEndMs))
                    .col(name(R::RunType, 16))
                    .col(name(R::State, 16))
                    .col(text(R::Conf))
                    .col(ColumnDef::new(R::DagHash).string_len(64).null())
                    .col(big_null(R::BackfillId))
                    .col(big(R::QueuedAtMs))
                    .col(big_null(R::StartMs))
                    .col(big_null(R::EndMs))
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "pipeline_runs_run_id",
            R::Table,
            vec![R::DagId.into_iden(), R::RunId.into_iden()],
            true,
        )
        .await?;
        index(
            manager,
            "pipeline_runs_logical",
            R::Table,
            vec![R::DagId.into_iden(), R::LogicalDateMs.into_iden()],
            true,
        )
        .await?;
        index(
            manager,
            "pipeline_runs_state",
            R::Table,
            vec![
                R::State.into_iden(),
                R::DagId.into_iden(),
                R::LogicalDateMs.into_iden(),
            ],
            false,
        )
        .await?;
        index(
            manager,
            "pipeline_runs_backfill",
            R::Table,
            vec![R::BackfillId.into_iden(), R::State.into_iden()],
            false,
        )
        .await?;

        use PipelineTaskInstances as T;
        manager
            .create_table(
                Table::create()
                    .table(T::Table)
                    .if_not_exists()
                    .col(id(T::Id))
                    .col(big(T::RunPk))
                    .col(name(T::DagId, 250))
                    .col(name(T::TaskId, 250))
                    .col(name(T::State, 16))
                    .col(int(T::TryNumber))
                    .col(int(T::MaxTries))
                    .col(int(T::PendingUpstream))
                    // JSON arrays of task ids, from the DAG version the run started with.
                    .col(text(T::Upstream))
                    .col(text(T::Downstream))
                    .col(name(T::Pool, 250))
                    .col(int(T::PriorityWeight))
                    .col(name(T::TaskType, 64))
                    // JSON of the task as rendered for the current try (P13: recorded).
                    .col(text_null(T::Rendered))
                    .col(big_null(T::ReadyAtMs))
                    .col(big_null(T::QueuedAtMs))
                    .col(big_null(T::StartMs))
                    .col(big_null(T::EndMs))
                    .col(big_null(T::DurationMs))
                    .col(big_null(T::HeartbeatAtMs))
                    .col(big_null(T::NextAttemptAtMs))
                    .col(ColumnDef::new(T::Worker).string_len(250).null())
                    .col(int_null(T::ExitCode))
                    .col(text_null(T::Error))
                    .foreign_key(
                        ForeignKey::create()
                            .from(T::Table, T::RunPk)
                            .to(R::Table, R::Id),
                    )
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "pipeline_ti_run_task",
            T::Table,
            vec![T::RunPk.into_iden(), T::TaskId.into_iden()],
            true,
        )
        .await?;
        index(
            manager,
            "pipeline_ti_state_pool",
            T::Table,
            vec![T::State.into_iden(), T::Pool.into_iden()],
            false,
        )
        .await?;
        index(
            manager,
            "pipeline_ti_dag_state",
            T::Table,
            vec![T::DagId.into_iden(), T::State.into_iden()],
            false,
        )
        .await?;

        use PipelineTaskTries as Y;
        manager
            .create_table(
                Table::create()
                    .table(Y::Table)
                    .if_not_exists()
                    .col(big(Y::TiId))
                    .col(int(Y::TryNumber))
                    .col(name(Y::State, 16))
                    .col(big_null(Y::StartMs))
                    .col(big_null(Y::EndMs))
                    .col(ColumnDef::new(Y::Worker).string_len(250).null())
                    .col(int_null(Y::ExitCode))
                    .col(text_null(Y::Error))
                    .primary_key(Index::create().col(Y::TiId).col(Y::TryNumber))
                    .to_owned(),
            )
            .await?;

        use PipelineTaskLogs as L;
        manager
            .create_table(
                Table::create()
                    .table(L::Table)
                    .if_not_exists()
                    .col(id(L::Id))
                    .col(big(L::TiId))
                    .col(int(L::TryNumber))
                    .col(text(L::Chunk))
                    .col(big(L::CreatedAtMs))
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "pipeline_logs_try",
            L::Table,
            vec![
                L::TiId.into_iden(),
                L::TryNumber.into_iden(),
                L::Id.into_iden(),
            ],
            false,
        )
        .await?;

        use PipelinePools as P;
        manager
            .create_table(
                Table::create()
                    .table(P::Table)
                    .if_not_exists()
                    .col(name(P::Name, 250).primary_key())
                    .col(int(P::Slots))
                    .col(text(P::Description))
                    .to_owned(),
            )
            .await?;

        use PipelineBackfills as B;
        manager
            .create_table(
                Table::create()
                    .table(B::Table)
                    .if_not_exists()
                    .col(id(B::Id))
                    .col(name(B::DagId, 250))
                    .col(big(B::FromMs))
                    .col(big(B::ToMs))
                    .col(name(B::Reprocess, 16))
                    .col(int(B::MaxActiveRuns))
                    .col(name(B::State, 16))
                    .col(int(B::TotalRuns))
                    .col(big(B::CreatedAtMs))
                    .col(text(B::CreatedBy))
                    .to_owned(),
            )
            .await?;

        use PipelineDatasetEvents as E;
        manager
            .create_table(
                Table::create()
                    .table(E::Table)
                    .if_not_exists()
                    .col(id(E::Id))
                    .col(name(E::Dataset, 250))
                    .col(text(E::Extra))
                    .col(big(E::CreatedAtMs))
                    .to_owned(),
            )
            .await?;
        index(
            manager,
            "pipeline_dataset_events_name",
            E::Table,
            vec![E::Dataset.into_iden(), E::Id.into_iden()],
            false,
        )
        .await?;

        use PipelineImportErrors as X;
        manager
            .create_table(
                Table::create()
                    .table(X::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(X::File).string_len(1000).not_null())
                    .col(int(X::Line))
                    .col(text(X::Message))
                    .col(big(X::UpdatedAtMs))
                    .to_owned(),
            )
            .await?;

        use PipelineSchedulerLease as S;
        manager
            .create_table(
                Table::create()
                    .table(S::Table)
                    .if_not_exists()
                    .col(name(S::Name, 64).primary_key())
                    .col(text(S::Holder))
                    .col(big(S::Token))
                    .col(big(S::ExpiresAtMs))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            PipelineSchedulerLease::Table.into_iden(),
            PipelineImportErrors::Table.into_iden(),
            PipelineDatasetEvents::Table.into_iden(),
            PipelineBackfills::Table.into_iden(),
            PipelinePools::Table.into_iden(),
            PipelineTaskLogs::Table.into_iden(),
            PipelineTaskTries::Table.into_iden(),
            PipelineTaskInstances::Table.into_iden(),
            PipelineRuns::Table.into_iden(),
            PipelineDagVersions::Table.into_iden(),
            PipelineDags::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(t).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
