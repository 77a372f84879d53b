//! `bulwark`: the one binary.

use bulwark::commands::{self, Cli, CliError, Command, ConfigAction, MigrateAction, TokenAction};
use bulwark_kernel::config::Settings;
use clap::{CommandFactory, FromArgMatches};

fn main() {
    let modules = bulwark::modules::compiled();
    let version: &'static str = Box::leak(bulwark::version_line().into_boxed_str());
    let mut cmd = Cli::command().version(version);
    for m in &modules {
        if let Some(sub) = m.command() {
            cmd = cmd.subcommand(sub.name(m.name()));
        }
    }
    let matches = cmd.get_matches();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async move {
        let config = matches.get_one::<std::path::PathBuf>("config").cloned();
        let settings = Settings::load(config.as_deref())?;
        if let Some((name, sub)) = matches.subcommand()
            && let Some(m) = modules.iter().find(|m| m.name() == name)
        {
            return m
                .run_command(&settings, sub)
                .await
                .map_err(|e| CliError::Other(e.into()));
        }
        let cli = Cli::from_arg_matches(&matches).map_err(|e| CliError::Other(e.into()))?;
        run(cli, settings).await
    });
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(error.exit_code());
    }
}

async fn run(cli: Cli, settings: Settings) -> Result<(), CliError> {
    match cli.command {
        Command::Serve { role } => {
            // Config errors exit 2 before anything connects; `build` reuses the result.
            commands::check(&settings)?;
            let app = bulwark::Application::build(settings, role).await?;
            app.run_until_stopped().await?;
            // Flush traces last: the process-wide exporter outlives any one application.
            bulwark_kernel::telemetry::shutdown();
            Ok(())
        }
        Command::Migrate { action } => {
            commands::migrate(&settings, action.unwrap_or(MigrateAction::Up)).await
        }
        Command::Config {
            action: ConfigAction::Check,
        } => commands::config_check(&settings).await,
        Command::Token {
            action: TokenAction::Issue { sub, role, ttl },
        } => commands::token_issue(&settings, &sub, role, ttl).await,
    }
}
