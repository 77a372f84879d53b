//! Kernel migrations: the embedded bus's tables.
mod m20261126_000001_bus;

crate::module_migrator!(
    "bulwark_migrations_kernel",
    [m20261126_000001_bus::Migration]
);
