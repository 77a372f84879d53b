//! The `pipeline` module. Data-aware pipeline orchestrator (P1–P15): DAGs, logical dates, backfills, quality gates.
//!
//! This crate holds the module's entry point; its features arrive with the module's issue.

pub mod dag;
pub mod schedule;
pub mod template;
pub mod validate;

use bulwark_kernel::config::{ConfigError, Settings};
use bulwark_kernel::module::{Context, Module, ModuleError, ModuleParts, status_route};
use serde::{Deserialize, Serialize};

/// The `[pipeline]` config section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {}

impl bulwark_kernel::config::ModuleConfig for PipelineConfig {}

/// The module value the app registers.
pub struct PipelineModule;

#[async_trait::async_trait]
impl Module for PipelineModule {
    fn name(&self) -> &'static str {
        "pipeline"
    }

    fn check_config(&self, settings: &Settings) -> Result<serde_json::Value, ConfigError> {
        Ok(settings
            .module_section::<PipelineConfig>(self.name())?
            .effective)
    }

    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        let effective = ctx.section::<PipelineConfig>()?.effective;
        let (routes, openapi) = status_route(self.name(), effective);
        Ok(ModuleParts {
            routes,
            openapi,
            ..ModuleParts::default()
        })
    }
}
