//! A try's details (issue 13): what a `sql` task reports beyond its log — bytes read against
//! file bytes (P12), rows written, the Delta version and application transaction it committed
//! (P8, P14), its quality-gate results (P10) — as one JSON text, shown next to the task.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum PipelineTaskTries {
    Table,
    Details,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(PipelineTaskTries::Table)
                    .add_column(ColumnDef::new(PipelineTaskTries::Details).text().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(PipelineTaskTries::Table)
                    .drop_column(PipelineTaskTries::Details)
                    .to_owned(),
            )
            .await
    }
}
