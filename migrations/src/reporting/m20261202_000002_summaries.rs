//! The summaries (R4): per-day aggregates of warehouse tables, one row per report, day and
//! group, written by the summary task and read by the report API (never the warehouse). A
//! report's state records how far the warehouse has been summarised (the highest change LSN
//! folded in) and when. `day` is `YYYY-MM-DD` (UTC), `grp` and `metrics` are JSON text.
//! `reporting_backfills` records each finished chunk of `bulwark reporting backfill`, so a
//! killed backfill resumes after it (R5).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ReportingSummaries {
    Table,
    Report,
    Day,
    Grp,
    Metrics,
    RefreshedAtMs,
}

#[derive(DeriveIden)]
enum ReportingSummaryState {
    Table,
    Report,
    Lsn,
    Days,
    RefreshedAtMs,
}

#[derive(DeriveIden)]
enum ReportingBackfills {
    Table,
    SourceTable,
    ColumnName,
    ChunkStart,
    ChunkEnd,
    Rows,
    DoneAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ReportingSummaries::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(ReportingSummaries::Report)
                            .string()
                            .not_null(),
                    )
                    .col(ColumnDef::new(ReportingSummaries::Day).string().not_null())
                    .col(ColumnDef::new(ReportingSummaries::Grp).string().not_null())
                    .col(
                        ColumnDef::new(ReportingSummaries::Metrics)
                            .text()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingSummaries::RefreshedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(ReportingSummaries::Report)
                            .col(ReportingSummaries::Day)
                            .col(ReportingSummaries::Grp),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ReportingSummaryState::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(ReportingSummaryState::Report)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(ReportingSummaryState::Lsn)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingSummaryState::Days)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingSummaryState::RefreshedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ReportingBackfills::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(ReportingBackfills::SourceTable)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingBackfills::ColumnName)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingBackfills::ChunkStart)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingBackfills::ChunkEnd)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingBackfills::Rows)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingBackfills::DoneAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(ReportingBackfills::SourceTable)
                            .col(ReportingBackfills::ColumnName)
                            .col(ReportingBackfills::ChunkStart)
                            .col(ReportingBackfills::ChunkEnd),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ReportingBackfills::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ReportingSummaryState::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ReportingSummaries::Table).to_owned())
            .await
    }
}
