//! Migrations of the `annotation` module. Its tables arrive with the module's own issue.
crate::module_migrator!("bulwark_migrations_annotation", []);
