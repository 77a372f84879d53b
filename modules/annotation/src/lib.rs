//! The `annotation` module. Annotation platform (N1–N11): work queue, locks, audit trail, agreement, dataset versions.
//!
//! This crate holds the module's entry point; its features arrive with the module's issue.

pub mod agreement;

use bulwark_kernel::config::{ConfigError, Settings};
use bulwark_kernel::module::{Context, Module, ModuleError, ModuleParts, status_route};
use serde::{Deserialize, Serialize};

/// The `[annotation]` config section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnnotationConfig {}

impl bulwark_kernel::config::ModuleConfig for AnnotationConfig {}

/// The module value the app registers.
pub struct AnnotationModule;

#[async_trait::async_trait]
impl Module for AnnotationModule {
    fn name(&self) -> &'static str {
        "annotation"
    }

    fn check_config(&self, settings: &Settings) -> Result<serde_json::Value, ConfigError> {
        Ok(settings
            .module_section::<AnnotationConfig>(self.name())?
            .effective)
    }

    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        let effective = ctx.section::<AnnotationConfig>()?.effective;
        let (routes, openapi) = status_route(self.name(), effective);
        Ok(ModuleParts {
            routes,
            openapi,
            ..ModuleParts::default()
        })
    }
}
