//! Migrations of the `pipeline` module (P1–P7, P15).
mod m20261201_000001_pipeline;

crate::module_migrator!(
    "bulwark_migrations_pipeline",
    [m20261201_000001_pipeline::Migration]
);
