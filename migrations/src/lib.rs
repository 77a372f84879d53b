//! Schema migrations for Bulwark.
//!
//! Each module owns a folder and its own migration history table
//! (`bulwark_migrations_<module>`), so a binary built without a module neither needs nor
//! trips over that module's applied migrations. The kernel's set always runs first.
//!
//! Every migration is expand-then-contract: during a rolling update the previous release runs
//! against the new schema, so a migration only adds (tables, nullable columns, indexes built
//! without blocking); dropping or renaming happens in a later release, once no running version
//! reads the old shape. See docs/database.md.

use std::marker::PhantomData;

#[doc(hidden)]
pub use async_trait as __async_trait;
use async_trait::async_trait;
pub use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseConnection;

pub mod kernel;

#[cfg(feature = "annotation")]
pub mod annotation;
#[cfg(feature = "auction")]
pub mod auction;
#[cfg(feature = "cache")]
pub mod cache;
#[cfg(feature = "pipeline")]
pub mod pipeline;
#[cfg(feature = "reporting")]
pub mod reporting;

/// One module's migration history, behind an object-safe face so the app can list them.
#[async_trait]
pub trait MigrationSet: Send + Sync {
    /// The owning module (`kernel`, `cache`, ...).
    fn module(&self) -> &'static str;
    /// Apply every pending migration.
    async fn up(&self, db: &DatabaseConnection) -> Result<(), DbErr>;
    /// Roll back the last `steps` applied migrations.
    async fn down(&self, db: &DatabaseConnection, steps: u32) -> Result<(), DbErr>;
    /// Every migration by name, with whether it is applied.
    async fn status(&self, db: &DatabaseConnection) -> Result<Vec<(String, bool)>, DbErr>;
}

struct Set<M>(&'static str, PhantomData<fn() -> M>);

#[async_trait]
impl<M: MigratorTrait> MigrationSet for Set<M> {
    fn module(&self) -> &'static str {
        self.0
    }
    async fn up(&self, db: &DatabaseConnection) -> Result<(), DbErr> {
        M::up(db, None).await
    }
    async fn down(&self, db: &DatabaseConnection, steps: u32) -> Result<(), DbErr> {
        M::down(db, Some(steps)).await
    }
    async fn status(&self, db: &DatabaseConnection) -> Result<Vec<(String, bool)>, DbErr> {
        let applied: Vec<String> = M::get_applied_migrations(db)
            .await?
            .iter()
            .map(|m| m.name().to_owned())
            .collect();
        Ok(M::migrations()
            .iter()
            .map(|m| {
                let name = m.name().to_owned();
                let done = applied.contains(&name);
                (name, done)
            })
            .collect())
    }
}

/// The migration sets compiled into this build, kernel first.
pub fn sets() -> Vec<Box<dyn MigrationSet>> {
    // `mut` is unused in a build without modules.
    #[allow(unused_mut)]
    let mut sets: Vec<Box<dyn MigrationSet>> =
        vec![Box::new(Set::<kernel::Migrator>("kernel", PhantomData))];
    #[cfg(feature = "cache")]
    sets.push(Box::new(Set::<cache::Migrator>("cache", PhantomData)));
    #[cfg(feature = "auction")]
    sets.push(Box::new(Set::<auction::Migrator>("auction", PhantomData)));
    #[cfg(feature = "annotation")]
    sets.push(Box::new(Set::<annotation::Migrator>(
        "annotation",
        PhantomData,
    )));
    #[cfg(feature = "pipeline")]
    sets.push(Box::new(Set::<pipeline::Migrator>("pipeline", PhantomData)));
    #[cfg(feature = "reporting")]
    sets.push(Box::new(Set::<reporting::Migrator>(
        "reporting",
        PhantomData,
    )));
    sets
}

/// Declares a module's `Migrator` with its own history table.
#[macro_export]
macro_rules! module_migrator {
    ($table:literal, [$($m:expr),* $(,)?]) => {
        pub struct Migrator;

        #[$crate::__async_trait::async_trait]
        impl sea_orm_migration::MigratorTrait for Migrator {
            fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
                vec![$(Box::new($m)),*]
            }
            fn migration_table_name() -> sea_orm_migration::sea_orm::DynIden {
                use sea_orm_migration::prelude::IntoIden;
                sea_orm_migration::prelude::Alias::new($table).into_iden()
            }
        }
    };
}
