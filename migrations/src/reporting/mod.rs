//! Migrations of the `reporting` module (R2).
mod m20261202_000001_capture;

crate::module_migrator!(
    "bulwark_migrations_reporting",
    [m20261202_000001_capture::Migration]
);
