//! The CLI (clap): `serve`, `migrate`, `config check`, `token issue`, plus each module's own
//! subcommand (added at run time through the `Module` trait).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bulwark_kernel::auth::{Authenticator, Role};
use bulwark_kernel::config::{ConfigError, Settings};
use bulwark_kernel::module::{Module, ProcessRole};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bulwark", about = "Bulwark: one binary, five modules.")]
pub struct Cli {
    /// Config file layered over the compiled-in defaults (also BULWARK_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve {
        /// Which parts to run in this process.
        #[arg(long, value_enum, default_value = "all")]
        role: ProcessRole,
    },
    /// Database migrations of the kernel and every compiled-in module.
    Migrate {
        #[command(subcommand)]
        action: Option<MigrateAction>,
    },
    /// Configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Local JWTs (HS256).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// List the modules compiled into this binary, one per line, in start order.
    Modules,
}

#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Apply every pending migration (the default).
    Up,
    /// Roll back the last applied migrations of one module.
    Down(DownArgs),
    /// List every migration and whether it is applied.
    Status,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// Module whose migrations to roll back (`kernel`, `cache`, ...).
    #[arg(long)]
    pub module: String,
    /// How many migrations to roll back.
    #[arg(long, default_value_t = 1)]
    pub steps: u32,
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate and print the effective config (secrets redacted); exit 2 naming a bad key.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Mint a token signed with the configured (or generated) HS256 secret.
    Issue {
        /// The subject (user name).
        #[arg(long)]
        sub: String,
        /// The role.
        #[arg(long, value_enum)]
        role: Role,
        /// Lifetime, e.g. `1h`, `30m`.
        #[arg(long, default_value = "1h", value_parser = humantime_duration)]
        ttl: Duration,
    },
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("not a duration like `1h` or `30m`: {e}"))
}

/// Errors that map to distinct exit codes.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Exit 2: the configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Exit 1: anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Config(_) => 2,
            CliError::Other(_) => 1,
        }
    }
}

/// Validate the config: its sections against the module list (`modules::KNOWN` and the
/// `modules` of this binary), the kernel's part, and every enabled module's section.
pub fn check(settings: &Settings, modules: &[Arc<dyn Module>]) -> Result<toml::Table, ConfigError> {
    let ignored = check_sections(settings, modules)?;
    for section in ignored {
        // Printed, not logged: `config check` runs before logging is set up.
        eprintln!(
            "warning: config section `{section}` is for a module not compiled into this binary; ignored"
        );
    }
    let mut out = toml::Table::try_from(&settings.kernel)
        .map_err(|e| ConfigError::new("(kernel)", e.to_string()))?;
    for m in modules.iter().filter(|m| settings.module_enabled(m.name())) {
        let value = without_nulls(m.check_config(settings)?);
        let table =
            toml::Value::try_from(value).map_err(|e| ConfigError::new(m.name(), e.to_string()))?;
        out.insert(m.name().to_owned(), table);
    }
    Ok(out)
}

/// Unknown sections and unknown names in `modules.enabled` are refused; returns the sections of
/// known modules that this binary does not have.
fn check_sections(
    settings: &Settings,
    modules: &[Arc<dyn Module>],
) -> Result<Vec<String>, ConfigError> {
    let compiled: Vec<&str> = modules.iter().map(|m| m.name()).collect();
    settings.check_modules(crate::modules::KNOWN, &compiled)
}

/// TOML has no null: unset optional keys are left out of the effective config.
fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

pub async fn config_check(
    settings: &Settings,
    modules: &[Arc<dyn Module>],
) -> Result<(), CliError> {
    let table = check(settings, modules)?;
    let rendered = toml::to_string_pretty(&table).context("render config")?;
    println!("# effective configuration (secrets redacted)\n{rendered}");
    Ok(())
}

pub async fn token_issue(
    settings: &Settings,
    sub: &str,
    role: Role,
    ttl: Duration,
) -> Result<(), CliError> {
    let auth = Authenticator::from_config(&settings.kernel)
        .await
        .context("auth")?;
    let token = auth.issue(sub, role, ttl).context("issue token")?;
    println!("{token}");
    Ok(())
}

pub async fn migrate(settings: &Settings, action: MigrateAction) -> Result<(), CliError> {
    let db = bulwark_kernel::db::connect(&settings.kernel.database)
        .await
        .context("database")?;
    match action {
        MigrateAction::Up => {
            crate::migrate_up(&db, &settings.kernel.database).await?;
            println!("migrations applied");
        }
        MigrateAction::Down(args) => {
            let set = bulwark_migrations::sets()
                .into_iter()
                .find(|s| s.module() == args.module)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--module: no migrations for `{}` in this build",
                        args.module
                    )
                })?;
            set.down(&db, args.steps).await.context("roll back")?;
            println!("rolled back {} migration(s) of {}", args.steps, args.module);
        }
        MigrateAction::Status => {
            for set in bulwark_migrations::sets() {
                for (name, applied) in set.status(&db).await.context("status")? {
                    println!(
                        "{:<12} {:<8} {name}",
                        set.module(),
                        if applied { "applied" } else { "pending" }
                    );
                }
            }
        }
    }
    Ok(())
}

/// The whole CLI: parse `args` (with each module's subcommand added), run, return the exit
/// code (0 ok, 1 failure, 2 bad config or usage). `main` is this plus `process::exit`.
pub fn main(modules: Vec<Arc<dyn Module>>, args: impl IntoIterator<Item = OsString>) -> i32 {
    bulwark_kernel::install_crypto_provider();
    let version: &'static str = Box::leak(crate::version_line().into_boxed_str());
    let mut cmd = Cli::command().version(version);
    for m in &modules {
        if let Some(sub) = m.command() {
            cmd = cmd.subcommand(sub.name(m.name()));
        }
    }
    let matches = match cmd.try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => {
            // Help and version print and exit 0; usage errors name the argument and exit 2.
            let _ = e.print();
            return e.exit_code();
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return 1;
        }
    };
    let result = runtime.block_on(async move {
        let config = matches.get_one::<PathBuf>("config").cloned();
        if matches.subcommand_name() == Some("modules") {
            // Needs no config: scripts ask the binary which modules it has.
            for m in &modules {
                println!("{}", m.name());
            }
            return Ok(());
        }
        let settings = Settings::load(config.as_deref())?;
        check_sections(&settings, &modules)?;
        if let Some((name, sub)) = matches.subcommand()
            && let Some(m) = modules.iter().find(|m| m.name() == name)
        {
            return m
                .run_command(&settings, sub)
                .await
                .map_err(|e| CliError::Other(e.into()));
        }
        let cli = Cli::from_arg_matches(&matches).map_err(|e| CliError::Other(e.into()))?;
        run(cli, settings, modules).await
    });
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("error: {error:#}");
            error.exit_code()
        }
    }
}

async fn run(cli: Cli, settings: Settings, modules: Vec<Arc<dyn Module>>) -> Result<(), CliError> {
    match cli.command {
        Command::Serve { role } => {
            // Config errors exit 2 before anything connects (inside `build` they would exit 1).
            check(&settings, &modules)?;
            let app = crate::Application::build_with_modules(settings, role, modules).await?;
            app.run_until_stopped().await?;
            // Flush traces last: the process-wide exporter outlives any one application.
            bulwark_kernel::telemetry::shutdown();
            Ok(())
        }
        Command::Migrate { action } => {
            migrate(&settings, action.unwrap_or(MigrateAction::Up)).await
        }
        Command::Config {
            action: ConfigAction::Check,
        } => config_check(&settings, &modules).await,
        Command::Token {
            action: TokenAction::Issue { sub, role, ttl },
        } => token_issue(&settings, &sub, role, ttl).await,
        Command::Modules => Ok(()),
    }
}
