//! Migrations of the `reporting` module (R2, R4).
mod m20261202_000001_capture;
mod m20261202_000002_summaries;

crate::module_migrator!(
    "bulwark_migrations_reporting",
    [
        m20261202_000001_capture::Migration,
        m20261202_000002_summaries::Migration
    ]
);
