//! The `reporting` module. Reporting off the primary (R1–R6): CDC into a columnar store, pre-aggregated reports.
//!
//! This crate holds the module's entry point; its features arrive with the module's issue.

use bulwark_kernel::config::{ConfigError, Settings};
use bulwark_kernel::module::{Context, Module, ModuleError, ModuleParts, status_route};
use serde::{Deserialize, Serialize};

/// The `[reporting]` config section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReportingConfig {}

impl bulwark_kernel::config::ModuleConfig for ReportingConfig {}

/// The module value the app registers.
pub struct ReportingModule;

#[async_trait::async_trait]
impl Module for ReportingModule {
    fn name(&self) -> &'static str {
        "reporting"
    }

    fn check_config(&self, settings: &Settings) -> Result<serde_json::Value, ConfigError> {
        Ok(settings
            .module_section::<ReportingConfig>(self.name())?
            .effective)
    }

    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        let effective = ctx.section::<ReportingConfig>()?.effective;
        let (routes, openapi) = status_route(self.name(), effective);
        Ok(ModuleParts {
            routes,
            openapi,
            ..ModuleParts::default()
        })
    }
}
