//! A clean hand-over of a bid partition (issue 14, item 1): `released_at_ms` is set by an
//! owner that stopped with nothing in flight (every delivery acked or handed back), and cleared
//! by the next claim. A claim that finds it unset knows the previous owner died or lost its
//! lease with deliveries possibly in flight, and waits for the bus to return them before it
//! fetches anything later. Expand-only: a nullable column.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuctionPartitionOwners {
    Table,
    ReleasedAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(AuctionPartitionOwners::Table)
                    .add_column(
                        ColumnDef::new(AuctionPartitionOwners::ReleasedAtMs)
                            .big_integer()
                            .null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(AuctionPartitionOwners::Table)
                    .drop_column(AuctionPartitionOwners::ReleasedAtMs)
                    .to_owned(),
            )
            .await
    }
}
