//! Migrations of the `pipeline` module (P1–P7, P15).
mod m20261201_000001_pipeline;
mod m20261202_000001_try_details;

crate::module_migrator!(
    "bulwark_migrations_pipeline",
    [
        m20261201_000001_pipeline::Migration,
        m20261202_000001_try_details::Migration
    ]
);
