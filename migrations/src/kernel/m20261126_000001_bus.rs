//! The embedded bus's tables (K4): streams, messages, duplicate-window ids, durable consumer
//! cursors and in-flight deliveries. Portable across SQLite and PostgreSQL (schema builder
//! only); times are Unix milliseconds so every process sharing the database compares the same
//! clock-independent integers.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum BusStreams {
    Table,
    Name,
    Subjects,
    DuplicateWindowMs,
    MaxAgeMs,
}

#[derive(DeriveIden)]
enum BusMessages {
    Table,
    Seq,
    Stream,
    Subject,
    MsgId,
    Headers,
    Payload,
    PublishedAtMs,
}

#[derive(DeriveIden)]
enum BusDedup {
    Table,
    Stream,
    MsgId,
    Seq,
    ExpiresAtMs,
}

#[derive(DeriveIden)]
enum BusConsumers {
    Table,
    Stream,
    Durable,
    CursorSeq,
    Spec,
}

#[derive(DeriveIden)]
enum BusDeliveries {
    Table,
    Stream,
    Durable,
    Seq,
    Delivered,
    VisibleAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(BusStreams::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(BusStreams::Name)
                            .string_len(255)
                            .not_null()
                            .primary_key(),
                    )
                    // JSON array of subject patterns.
                    .col(ColumnDef::new(BusStreams::Subjects).text().not_null())
                    .col(
                        ColumnDef::new(BusStreams::DuplicateWindowMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(ColumnDef::new(BusStreams::MaxAgeMs).big_integer().null())
                    .to_owned(),
            )
            .await?;

        // One global sequence: AUTOINCREMENT (SQLite) / bigserial (PostgreSQL) never reuses a
        // value, so sequences stay monotonic after the janitor deletes old rows.
        manager
            .create_table(
                Table::create()
                    .table(BusMessages::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(BusMessages::Seq)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(BusMessages::Stream)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(ColumnDef::new(BusMessages::Subject).text().not_null())
                    .col(ColumnDef::new(BusMessages::MsgId).text().null())
                    // JSON object of header name to value.
                    .col(ColumnDef::new(BusMessages::Headers).text().not_null())
                    .col(ColumnDef::new(BusMessages::Payload).binary().not_null())
                    .col(
                        ColumnDef::new(BusMessages::PublishedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_bus_messages_stream_seq")
                    .table(BusMessages::Table)
                    .col(BusMessages::Stream)
                    .col(BusMessages::Seq)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(BusDedup::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(BusDedup::Stream).string_len(255).not_null())
                    .col(ColumnDef::new(BusDedup::MsgId).string_len(512).not_null())
                    .col(ColumnDef::new(BusDedup::Seq).big_integer().not_null())
                    .col(
                        ColumnDef::new(BusDedup::ExpiresAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(Index::create().col(BusDedup::Stream).col(BusDedup::MsgId))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(BusConsumers::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(BusConsumers::Stream)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(BusConsumers::Durable)
                            .string_len(255)
                            .not_null(),
                    )
                    // Highest stream sequence handed out to this consumer.
                    .col(
                        ColumnDef::new(BusConsumers::CursorSeq)
                            .big_integer()
                            .not_null(),
                    )
                    // JSON of the last declared spec, for operators.
                    .col(ColumnDef::new(BusConsumers::Spec).text().not_null())
                    .primary_key(
                        Index::create()
                            .col(BusConsumers::Stream)
                            .col(BusConsumers::Durable),
                    )
                    .to_owned(),
            )
            .await?;

        // Only in-flight (delivered, not yet acked or terminated) messages have a row.
        manager
            .create_table(
                Table::create()
                    .table(BusDeliveries::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(BusDeliveries::Stream)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(BusDeliveries::Durable)
                            .string_len(255)
                            .not_null(),
                    )
                    .col(ColumnDef::new(BusDeliveries::Seq).big_integer().not_null())
                    .col(
                        ColumnDef::new(BusDeliveries::Delivered)
                            .integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(BusDeliveries::VisibleAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(BusDeliveries::Stream)
                            .col(BusDeliveries::Durable)
                            .col(BusDeliveries::Seq),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_bus_deliveries_due")
                    .table(BusDeliveries::Table)
                    .col(BusDeliveries::Stream)
                    .col(BusDeliveries::Durable)
                    .col(BusDeliveries::VisibleAtMs)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            BusDeliveries::Table.into_iden(),
            BusConsumers::Table.into_iden(),
            BusDedup::Table.into_iden(),
            BusMessages::Table.into_iden(),
            BusStreams::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
