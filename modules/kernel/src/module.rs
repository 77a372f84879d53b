//! The contract between the kernel and a module.
//!
//! A module is one value implementing [`Module`]: its name (also its config section and URL
//! prefix), its config check, optional CLI subcommands, and `start`, which returns its HTTP
//! routes, OpenAPI paths, background workers and readiness checks together. The app lists
//! modules in one place (`app/src/modules.rs`); nothing else knows which exist.

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sea_orm::DatabaseConnection;

use crate::auth::Authenticator;
use crate::bus::{Bus, BusError};
use crate::config::{ConfigError, ModuleConfig, Section, Settings};
use crate::kv::{KvError, KvStore};
use crate::readiness::ReadinessCheck;
use crate::services::{ServiceError, ServiceKey, Services};
use crate::shutdown::Shutdown;

/// Which parts of the product this process runs (`serve --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessRole {
    /// Everything in one process (the embedded default).
    All,
    /// HTTP and WebSockets.
    Web,
    /// Bus consumers and executors.
    Worker,
    /// Time-driven work (closings, schedules); run one replica.
    Scheduler,
}

impl ProcessRole {
    pub fn serves_http(self) -> bool {
        matches!(self, ProcessRole::All | ProcessRole::Web)
    }
    /// Does this process run workers of `kind`?
    pub fn runs(self, kind: WorkerKind) -> bool {
        match kind {
            WorkerKind::Worker => matches!(self, ProcessRole::All | ProcessRole::Worker),
            WorkerKind::Scheduler => matches!(self, ProcessRole::All | ProcessRole::Scheduler),
            WorkerKind::Web => self.serves_http(),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessRole::All => "all",
            ProcessRole::Web => "web",
            ProcessRole::Worker => "worker",
            ProcessRole::Scheduler => "scheduler",
        }
    }
}

/// Where a background task belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    /// Runs beside the web server (e.g. fanning room broadcasts out to local sockets).
    Web,
    /// Bus consumers.
    Worker,
    /// Time-driven.
    Scheduler,
}

/// A module's background task. It must return when `Shutdown::closing_token` fires, and nak
/// what it cannot finish when `Shutdown::deadline_token` fires.
pub struct Worker {
    pub name: String,
    pub kind: WorkerKind,
    pub run: BoxFuture<'static, ()>,
}

/// Everything a module may use. Modules get services only from here: the kernel's as fields,
/// other modules' through [`Context::service`].
#[derive(Clone)]
pub struct Context {
    /// The module this context was handed to (set by [`Context::for_module`]).
    pub module: &'static str,
    pub settings: Settings,
    pub role: ProcessRole,
    /// Primary database (writes).
    pub db: DatabaseConnection,
    /// Read-only connection (a replica when `database.read_url` is set).
    pub db_read: DatabaseConnection,
    pub bus: Arc<dyn Bus>,
    pub kv: Arc<dyn KvStore>,
    pub auth: Arc<Authenticator>,
    pub shutdown: Shutdown,
    /// Handles modules offer each other (filled in start order).
    pub services: Services,
}

impl Context {
    /// The same context, handed to `module`.
    pub fn for_module(&self, module: &'static str) -> Self {
        Self {
            module,
            ..self.clone()
        }
    }

    /// This module's config section, typed and as effective config.
    pub fn section<T: ModuleConfig>(&self) -> Result<Section<T>, ConfigError> {
        self.settings.module_section(self.module)
    }

    /// Offer `value` to other modules under `key` (a key named after this module).
    pub fn provide<T: ?Sized + Send + Sync + 'static>(
        &self,
        key: ServiceKey<T>,
        value: Arc<T>,
    ) -> Result<(), ServiceError> {
        self.services.provide(self.module, key, value)
    }

    /// Another module's service. Fails, naming both modules, when the provider is not compiled
    /// in, not enabled, starts later, or did not provide it.
    pub fn service<T: ?Sized + Send + Sync + 'static>(
        &self,
        key: ServiceKey<T>,
    ) -> Result<Arc<T>, ServiceError> {
        self.services.get(self.module, key)
    }
}

/// What a started module hands back.
pub struct ModuleParts {
    /// Routes with absolute paths under `/api/<name>/`, `/ws/<name>/` or `/<name>/`.
    pub routes: axum::Router,
    /// OpenAPI paths and schemas of those routes (merged into `/api/openapi.json`).
    pub openapi: utoipa::openapi::OpenApi,
    pub workers: Vec<Worker>,
    pub readiness: Vec<Arc<dyn ReadinessCheck>>,
    /// Browser pages among those routes, linked from the home page (`/`).
    pub pages: Vec<crate::home::Page>,
}

impl Default for ModuleParts {
    fn default() -> Self {
        Self {
            routes: axum::Router::new(),
            openapi: utoipa::openapi::OpenApiBuilder::new().build(),
            workers: Vec::new(),
            readiness: Vec::new(),
            pages: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("{0}")]
    Other(String),
}

#[async_trait]
pub trait Module: Send + Sync {
    /// The module's name: its config section, URL prefix, cargo feature and metric label.
    fn name(&self) -> &'static str;

    /// Validate the module's config section; return it as effective config (secrets redacted).
    fn check_config(&self, settings: &Settings) -> Result<serde_json::Value, ConfigError>;

    /// A `bulwark <name> ...` subcommand, if the module has commands.
    fn command(&self) -> Option<clap::Command> {
        None
    }

    /// Run the module's subcommand with its parsed arguments.
    async fn run_command(
        &self,
        settings: &Settings,
        args: &clap::ArgMatches,
    ) -> Result<(), ModuleError> {
        let _ = (settings, args);
        Err(ModuleError::Other(format!(
            "module `{}` has no commands",
            self.name()
        )))
    }

    /// Start: declare streams, build routes and workers. Called once per process.
    async fn start(&self, ctx: &Context) -> Result<ModuleParts, ModuleError>;
}

/// The `GET /api/<module>/status` route every module offers (role viewer): what is compiled
/// in and running, with the module's effective config. Gives each module a real, authenticated
/// surface before its own issue fills it in.
pub fn status_route(
    name: &'static str,
    effective_config: serde_json::Value,
) -> (axum::Router, utoipa::openapi::OpenApi) {
    use axum::routing::get;
    use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItem, PathsBuilder};
    use utoipa::openapi::response::ResponseBuilder;
    use utoipa::openapi::security::SecurityRequirement;
    use utoipa::openapi::{Content, ObjectBuilder};

    let path = format!("/api/{name}/status");
    let body = serde_json::json!({"module": name, "running": true, "config": effective_config});
    let router = axum::Router::new().route(
        &path,
        get(
            move |_auth: crate::auth::Auth<crate::auth::require::Viewer>| {
                let body = body.clone();
                async move { axum::Json(body) }
            },
        ),
    );
    let op = OperationBuilder::new()
        .tag(name)
        .summary(Some(format!("Status of the {name} module")))
        .security(SecurityRequirement::new("bearer", Vec::<String>::new()))
        .response(
            "200",
            ResponseBuilder::new()
                .description("Module status and effective config")
                .content(
                    "application/json",
                    Content::new(Some(ObjectBuilder::new().build())),
                )
                .build(),
        )
        .response(
            "401",
            ResponseBuilder::new()
                .description("Missing or invalid token")
                .build(),
        )
        .response(
            "403",
            ResponseBuilder::new()
                .description("Role viewer or above required")
                .build(),
        )
        .build();
    let doc = utoipa::openapi::OpenApiBuilder::new()
        .paths(PathsBuilder::new().path(path, PathItem::new(HttpMethod::Get, op)))
        .build();
    (router, doc)
}
