//! Migrations of the `auction` module (A1–A11).
mod m20261126_000001_auctions;
mod m20261201_000001_partition_owners;
mod m20261208_000001_partition_release;

crate::module_migrator!(
    "bulwark_migrations_auction",
    [
        m20261126_000001_auctions::Migration,
        m20261201_000001_partition_owners::Migration,
        m20261208_000001_partition_release::Migration
    ]
);
