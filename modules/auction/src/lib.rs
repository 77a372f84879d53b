//! The `auction` module. Real-time WebSocket bidding (A1–A11): durable queue before ACK, idempotent worker, cross-instance broadcast.
//!
//! This crate holds the module's entry point; its features arrive with the module's issue.

use bulwark_kernel::config::{ConfigError, Settings};
use bulwark_kernel::module::{Context, Module, ModuleError, ModuleParts, status_route};
use serde::{Deserialize, Serialize};

/// The `[auction]` config section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuctionConfig {}

/// The module value the app registers.
pub struct AuctionModule;

#[async_trait::async_trait]
impl Module for AuctionModule {
    fn name(&self) -> &'static str {
        "auction"
    }

    fn check_config(&self, settings: &Settings) -> Result<serde_json::Value, ConfigError> {
        let cfg: AuctionConfig = settings.section("auction")?;
        serde_json::to_value(cfg).map_err(|e| ConfigError::new("auction", e.to_string()))
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
