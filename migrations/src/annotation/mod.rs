//! Migrations of the `annotation` module (N1–N10).
mod m20261201_000001_annotation;

crate::module_migrator!(
    "bulwark_migrations_annotation",
    [m20261201_000001_annotation::Migration]
);
