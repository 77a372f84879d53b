//! Migrations of the `reporting` module. Its tables arrive with the module's own issue.
crate::module_migrator!("bulwark_migrations_reporting", []);
