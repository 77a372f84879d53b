//! The fencing row of each bid partition (issue 14, item 3): the token of the partition's
//! current owner. A worker claims the row when it takes the partition's lease (the token only
//! ever grows), and every transaction that applies bids or closes an auction of the partition
//! first compares-and-sets it, so a previous owner whose lease ran out cannot write any more.
//! Expand-only: a new table.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuctionPartitionOwners {
    Table,
    PartitionId,
    Token,
    Owner,
    ClaimedAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuctionPartitionOwners::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(AuctionPartitionOwners::PartitionId)
                            .integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(AuctionPartitionOwners::Token)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(AuctionPartitionOwners::Owner)
                            .string_len(64)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(AuctionPartitionOwners::ClaimedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(AuctionPartitionOwners::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
