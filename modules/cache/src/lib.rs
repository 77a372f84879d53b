//! The `cache` module. Stampede-proof caching (C1–C7): jitter, stale-while-revalidate, distributed lock, declared policies, active invalidation.
//!
//! This crate holds the module's entry point; its features arrive with the module's issue.

use bulwark_kernel::config::{ConfigError, Settings};
use bulwark_kernel::module::{Context, Module, ModuleError, ModuleParts, status_route};
use serde::{Deserialize, Serialize};

/// The `[cache]` config section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {}

/// The module value the app registers.
pub struct CacheModule;

#[async_trait::async_trait]
impl Module for CacheModule {
    fn name(&self) -> &'static str {
        "cache"
    }

    fn check_config(&self, settings: &Settings) -> Result<serde_json::Value, ConfigError> {
        let cfg: CacheConfig = settings.section("cache")?;
        serde_json::to_value(cfg).map_err(|e| ConfigError::new("cache", e.to_string()))
    }

    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError> {
        let effective = self.check_config(&ctx.settings)?;
        let (routes, openapi) = status_route(self.name(), effective);
        Ok(ModuleParts {
            routes,
            openapi,
            ..ModuleParts::default()
        })
    }
}
