//! The change capture's own records (R2): which replication slots this Bulwark created (a slot
//! of the same name that is not here belongs to someone else and is refused), and which source
//! tables have had their initial snapshot published (a table not here is snapshotted, then
//! streamed). Times are Unix milliseconds.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ReportingSlots {
    Table,
    Slot,
    Publication,
    CreatedLsn,
    CreatedAtMs,
}

#[derive(DeriveIden)]
enum ReportingTables {
    Table,
    SourceTable,
    Slot,
    SnapshotLsn,
    SnapshotRows,
    SnapshotAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ReportingSlots::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(ReportingSlots::Slot)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(ReportingSlots::Publication)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingSlots::CreatedLsn)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingSlots::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(ReportingTables::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(ReportingTables::SourceTable)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(ReportingTables::Slot).string().not_null())
                    .col(
                        ColumnDef::new(ReportingTables::SnapshotLsn)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingTables::SnapshotRows)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(ReportingTables::SnapshotAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ReportingTables::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ReportingSlots::Table).to_owned())
            .await
    }
}
