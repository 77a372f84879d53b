//! Projects, items, locks, the append-only annotation log, reviews, counters and export jobs
//! (N1–N10). Times are Unix milliseconds from Bulwark's clock, as in the auction tables.
//!
//! * `annotation_annotations` is never updated: a correction is a new row whose `supersedes`
//!   names the row it replaces; the unique index on `supersedes` lets a row be replaced once,
//!   so two racing corrections cannot fork the history; `annotation_annotations_first` (unique
//!   `(item_id, annotator)` where `supersedes` is null) allows one first record per annotator and
//!   item. `(annotator, request_id)` is unique:
//!   a retried submit finds the first row instead of adding one.
//! * `annotation_locks` rows lapse by themselves: every reader compares `expires_at_ms` with
//!   the clock, so an expired lock frees its item without a sweeper.
//! * Counters (`annotation_counts`, `annotation_label_counts`, `annotation_daily`) are
//!   written in the same transaction as the rows they count, so progress never runs COUNT(*).
//!   The per-project rows are split over shards: concurrent submits update different rows
//!   instead of queueing on one.
//! * `(project_id, done, priority DESC, id)` serves the next-task claim in queue order.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AnnotationProjects {
    Table,
    Id,
    Name,
    Instructions,
    Labels,
    MultiLabel,
    Overlap,
    LockTtlMs,
    Version,
    CreatedAtMs,
}

#[derive(DeriveIden)]
enum AnnotationItems {
    Table,
    Id,
    ProjectId,
    ExternalId,
    Uri,
    Payload,
    Metadata,
    Priority,
    Version,
    AnnotationCount,
    Done,
    CreatedAtMs,
}

#[derive(DeriveIden)]
enum AnnotationLocks {
    Table,
    ItemId,
    Annotator,
    ProjectId,
    ExpiresAtMs,
    AcquiredAtMs,
}

#[derive(DeriveIden)]
enum AnnotationAnnotations {
    Table,
    Id,
    ProjectId,
    ItemId,
    Annotator,
    Labels,
    Supersedes,
    RequestId,
    LeadTimeMs,
    CreatedAtMs,
}

#[derive(DeriveIden)]
enum AnnotationReviews {
    Table,
    Id,
    AnnotationId,
    ProjectId,
    Reviewer,
    Verdict,
    Comment,
    CreatedAtMs,
}

#[derive(DeriveIden)]
enum AnnotationCounts {
    Table,
    ProjectId,
    Shard,
    Items,
    Completed,
    Annotations,
}

#[derive(DeriveIden)]
enum AnnotationLabelCounts {
    Table,
    ProjectId,
    Label,
    Shard,
    Count,
}

#[derive(DeriveIden)]
enum AnnotationDaily {
    Table,
    ProjectId,
    Annotator,
    Day,
    Submitted,
}

#[derive(DeriveIden)]
enum AnnotationExports {
    Table,
    Id,
    ProjectId,
    Spec,
    Format,
    State,
    RowsDone,
    RowsTotal,
    Path,
    Sha256,
    Manifest,
    Error,
    CreatedBy,
    CreatedAtMs,
    StartedAtMs,
    FinishedAtMs,
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
fn int(c: impl IntoIden) -> ColumnDef {
    ColumnDef::new(c).integer().not_null().to_owned()
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

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use AnnotationProjects as P;
        manager
            .create_table(
                Table::create()
                    .table(P::Table)
                    .if_not_exists()
                    .col(id(P::Id))
                    .col(name(P::Name, 200).unique_key())
                    .col(text(P::Instructions))
                    // JSON array of class names, in the schema's order.
                    .col(text(P::Labels))
                    .col(ColumnDef::new(P::MultiLabel).boolean().not_null())
                    .col(int(P::Overlap))
                    .col(big(P::LockTtlMs))
                    .col(big(P::Version))
                    .col(big(P::CreatedAtMs))
                    .to_owned(),
            )
            .await?;

        use AnnotationItems as I;
        manager
            .create_table(
                Table::create()
                    .table(I::Table)
                    .if_not_exists()
                    .col(id(I::Id))
                    .col(big(I::ProjectId))
                    .col(name(I::ExternalId, 255))
                    .col(text_null(I::Uri))
                    .col(text_null(I::Payload))
                    .col(text_null(I::Metadata))
                    .col(int(I::Priority))
                    .col(big(I::Version))
                    .col(int(I::AnnotationCount))
                    .col(ColumnDef::new(I::Done).boolean().not_null())
                    .col(big(I::CreatedAtMs))
                    .foreign_key(
                        ForeignKey::create()
                            .from(I::Table, I::ProjectId)
                            .to(P::Table, P::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("annotation_items_external")
                    .table(I::Table)
                    .col(I::ProjectId)
                    .col(I::ExternalId)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("annotation_items_queue")
                    .table(I::Table)
                    .col(I::ProjectId)
                    .col(I::Done)
                    .col((I::Priority, IndexOrder::Desc))
                    .col(I::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("annotation_items_page")
                    .table(I::Table)
                    .col(I::ProjectId)
                    .col(I::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;

        use AnnotationLocks as L;
        manager
            .create_table(
                Table::create()
                    .table(L::Table)
                    .if_not_exists()
                    .col(big(L::ItemId))
                    .col(name(L::Annotator, 255))
                    .col(big(L::ProjectId))
                    .col(big(L::ExpiresAtMs))
                    .col(big(L::AcquiredAtMs))
                    .primary_key(Index::create().col(L::ItemId).col(L::Annotator))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("annotation_locks_holder")
                    .table(L::Table)
                    .col(L::Annotator)
                    .col(L::ProjectId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("annotation_locks_expiry")
                    .table(L::Table)
                    .col(L::ExpiresAtMs)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;

        use AnnotationAnnotations as A;
        manager
            .create_table(
                Table::create()
                    .table(A::Table)
                    .if_not_exists()
                    .col(id(A::Id))
                    .col(big(A::ProjectId))
                    .col(big(A::ItemId))
                    .col(name(A::Annotator, 255))
                    // JSON array of class names.
                    .col(text(A::Labels))
                    .col(ColumnDef::new(A::Supersedes).big_integer().null())
                    .col(name(A::RequestId, 100))
                    .col(ColumnDef::new(A::LeadTimeMs).big_integer().null())
                    .col(big(A::CreatedAtMs))
                    .foreign_key(
                        ForeignKey::create()
                            .from(A::Table, A::ItemId)
                            .to(I::Table, I::Id),
                    )
                    .to_owned(),
            )
            .await?;
        for (index, cols, unique) in [
            (
                "annotation_annotations_request",
                vec![A::Annotator, A::RequestId],
                true,
            ),
            (
                "annotation_annotations_supersedes",
                vec![A::Supersedes],
                true,
            ),
            (
                "annotation_annotations_item",
                vec![A::ItemId, A::Annotator],
                false,
            ),
            (
                "annotation_annotations_page",
                vec![A::ProjectId, A::Id],
                false,
            ),
        ] {
            let mut ix = Index::create();
            ix.name(index).table(A::Table).if_not_exists();
            for c in cols {
                ix.col(c);
            }
            if unique {
                ix.unique();
            }
            manager.create_index(ix.to_owned()).await?;
        }

        // One first record per (item, annotator): a second plain submit loses here, so submit
        // needs no look-up before its insert. Partial indexes are written the same way in both
        // dialects.
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE UNIQUE INDEX IF NOT EXISTS annotation_annotations_first \
                 ON annotation_annotations (item_id, annotator) WHERE supersedes IS NULL",
            )
            .await?;

        use AnnotationReviews as R;
        manager
            .create_table(
                Table::create()
                    .table(R::Table)
                    .if_not_exists()
                    .col(id(R::Id))
                    .col(big(R::AnnotationId))
                    .col(big(R::ProjectId))
                    .col(name(R::Reviewer, 255))
                    .col(name(R::Verdict, 8))
                    .col(text(R::Comment))
                    .col(big(R::CreatedAtMs))
                    .foreign_key(
                        ForeignKey::create()
                            .from(R::Table, R::AnnotationId)
                            .to(A::Table, A::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("annotation_reviews_annotation")
                    .table(R::Table)
                    .col(R::AnnotationId)
                    .col(R::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;

        use AnnotationCounts as C;
        manager
            .create_table(
                Table::create()
                    .table(C::Table)
                    .if_not_exists()
                    .col(big(C::ProjectId))
                    .col(int(C::Shard))
                    .col(big(C::Items))
                    .col(big(C::Completed))
                    .col(big(C::Annotations))
                    .primary_key(Index::create().col(C::ProjectId).col(C::Shard))
                    .to_owned(),
            )
            .await?;
        use AnnotationLabelCounts as LC;
        manager
            .create_table(
                Table::create()
                    .table(LC::Table)
                    .if_not_exists()
                    .col(big(LC::ProjectId))
                    .col(name(LC::Label, 200))
                    .col(int(LC::Shard))
                    .col(big(LC::Count))
                    .primary_key(
                        Index::create()
                            .col(LC::ProjectId)
                            .col(LC::Label)
                            .col(LC::Shard),
                    )
                    .to_owned(),
            )
            .await?;
        use AnnotationDaily as D;
        manager
            .create_table(
                Table::create()
                    .table(D::Table)
                    .if_not_exists()
                    .col(big(D::ProjectId))
                    .col(name(D::Annotator, 255))
                    // UTC day, `YYYY-MM-DD`.
                    .col(name(D::Day, 10))
                    .col(big(D::Submitted))
                    .primary_key(
                        Index::create()
                            .col(D::ProjectId)
                            .col(D::Day)
                            .col(D::Annotator),
                    )
                    .to_owned(),
            )
            .await?;

        use AnnotationExports as E;
        manager
            .create_table(
                Table::create()
                    .table(E::Table)
                    .if_not_exists()
                    .col(id(E::Id))
                    .col(big(E::ProjectId))
                    .col(text(E::Spec))
                    .col(name(E::Format, 16))
                    // pending | running | done | failed
                    .col(name(E::State, 10))
                    .col(big(E::RowsDone))
                    .col(ColumnDef::new(E::RowsTotal).big_integer().null())
                    .col(text_null(E::Path))
                    .col(ColumnDef::new(E::Sha256).string_len(64).null())
                    .col(text_null(E::Manifest))
                    .col(text_null(E::Error))
                    .col(name(E::CreatedBy, 255))
                    .col(big(E::CreatedAtMs))
                    .col(ColumnDef::new(E::StartedAtMs).big_integer().null())
                    .col(ColumnDef::new(E::FinishedAtMs).big_integer().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("annotation_exports_state")
                    .table(E::Table)
                    .col(E::State)
                    .col(E::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            AnnotationExports::Table.into_iden(),
            AnnotationDaily::Table.into_iden(),
            AnnotationLabelCounts::Table.into_iden(),
            AnnotationCounts::Table.into_iden(),
            AnnotationReviews::Table.into_iden(),
            AnnotationAnnotations::Table.into_iden(),
            AnnotationLocks::Table.into_iden(),
            AnnotationItems::Table.into_iden(),
            AnnotationProjects::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(t).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
